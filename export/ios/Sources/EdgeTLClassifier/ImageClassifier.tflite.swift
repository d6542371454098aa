// Part of the edgetl bundle: runs the bundled .tflite with TensorFlowLiteSwift (added through CocoaPods).
import CoreGraphics
import Foundation
import TensorFlowLite

public final class ImageClassifier {
    public let labels: [String]
    private let interpreter: Interpreter

    public init(threads: Int = 2) throws {
        let bundle = Bundle.edgetlResources
        guard let modelPath = bundle.path(forResource: ModelSpec.modelName, ofType: ModelSpec.modelExtension),
              let labelsURL = bundle.url(forResource: "labels", withExtension: "txt") else {
            throw NSError(domain: "EdgeTLClassifier", code: 1, userInfo: [NSLocalizedDescriptionKey: "model or labels missing"])
        }
        labels = try String(contentsOf: labelsURL, encoding: .utf8).split(separator: "\n").map(String.init)
        var options = Interpreter.Options()
        options.threadCount = threads
        interpreter = try Interpreter(modelPath: modelPath, options: options)
        try interpreter.allocateTensors()
    }

    /// Top-k labels with softmax probabilities, best first.
    public func classify(_ image: CGImage, k: Int = 3) throws -> [Category] {
        Preprocessing.topK(try outputs(image), labels: labels, k: k)
    }

    /// Raw outputs (dequantized for int8), one per label: see ModelSpec.outputKind.
    public func outputs(_ image: CGImage) throws -> [Float] {
        let x = Preprocessing.normalize(Preprocessing.rgbaPixels(image))
        let data: Data
        switch ModelSpec.inputDtype {
        case "int8": data = Data(Preprocessing.quantize(x, low: -128, high: 127))
        case "uint8": data = Data(Preprocessing.quantize(x, low: 0, high: 255))
        default: data = x.withUnsafeBufferPointer { Data(buffer: $0) }
        }
        try interpreter.copy(data, toInputAt: 0)
        try interpreter.invoke()
        let output = try interpreter.output(at: 0)
        switch ModelSpec.outputDtype {
        case "int8": return output.data.map { Float(Int(Int8(bitPattern: $0)) - ModelSpec.outputZeroPoint) * ModelSpec.outputScale }
        case "uint8": return output.data.map { Float(Int($0) - ModelSpec.outputZeroPoint) * ModelSpec.outputScale }
        default: return output.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        }
    }
}
