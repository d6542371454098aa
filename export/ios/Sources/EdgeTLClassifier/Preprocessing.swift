// Part of the edgetl bundle: image to tensor exactly as edgetl verified the model.
import CoreGraphics
import Foundation

public struct Category: Equatable {
    public let index: Int
    public let label: String
    public let score: Float
}

public enum Preprocessing {
    /// RGBA8 pixels of `image` drawn at the model's input size (bilinear-quality interpolation).
    public static func rgbaPixels(_ image: CGImage) -> [UInt8] {
        let w = ModelSpec.inputWidth, h = ModelSpec.inputHeight
        var bytes = [UInt8](repeating: 0, count: w * h * 4)
        bytes.withUnsafeMutableBytes { buffer in
            let context = CGContext(data: buffer.baseAddress, width: w, height: h, bitsPerComponent: 8,
                                    bytesPerRow: w * 4, space: CGColorSpaceCreateDeviceRGB(),
                                    bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)!
            context.interpolationQuality = .medium
            context.draw(image, in: CGRect(x: 0, y: 0, width: w, height: h))
        }
        return bytes
    }

    /// NHWC float32 tensor: (pixel - mean) / std per channel.
    public static func normalize(_ rgba: [UInt8]) -> [Float] {
        var out = [Float](repeating: 0, count: rgba.count / 4 * 3)
        for i in 0..<(rgba.count / 4) {
            for c in 0..<3 {
                out[3 * i + c] = (Float(rgba[4 * i + c]) - ModelSpec.pixelMean[c]) / ModelSpec.pixelStd[c]
            }
        }
        return out
    }

    /// int8/uint8 bytes with the input tensor's scale and zero point.
    public static func quantize(_ x: [Float], low: Int, high: Int) -> [UInt8] {
        x.map { value in
            let q = Int((value / ModelSpec.inputScale).rounded()) + ModelSpec.inputZeroPoint
            return UInt8(bitPattern: Int8(truncatingIfNeeded: min(max(q, low), high)))
        }
    }

    public static func softmax(_ logits: [Float]) -> [Float] {
        let top = logits.max() ?? 0
        let e = logits.map { Float(exp(Double($0 - top))) }
        let sum = e.reduce(0, +)
        return e.map { $0 / sum }
    }

    /// The model's outputs as probabilities (softmax unless the model already ends in one).
    public static func probabilities(_ outputs: [Float]) -> [Float] {
        ModelSpec.outputKind == "probabilities" ? outputs : softmax(outputs)
    }

    public static func topK(_ outputs: [Float], labels: [String], k: Int) -> [Category] {
        let p = probabilities(outputs)
        return p.indices.sorted { p[$0] > p[$1] }.prefix(k).map { Category(index: $0, label: labels[$0], score: p[$0]) }
    }
}
