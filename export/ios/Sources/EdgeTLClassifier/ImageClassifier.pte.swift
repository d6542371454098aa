// Part of the edgetl bundle: runs the bundled .pte with ExecuTorch's Swift package (XNNPACK backend).
import CoreGraphics
import ExecuTorch
import Foundation

public final class ImageClassifier {
    public let labels: [String]
    private let module: Module

    public init() throws {
        let bundle = Bundle.edgetlResources
        guard let modelPath = bundle.path(forResource: ModelSpec.modelName, ofType: ModelSpec.modelExtension),
              let labelsURL = bundle.url(forResource: "labels", withExtension: "txt") else {
            throw NSError(domain: "EdgeTLClassifier", code: 1, userInfo: [NSLocalizedDescriptionKey: "model or labels missing"])
        }
        labels = try String(contentsOf: labelsURL, encoding: .utf8).split(separator: "\n").map(String.init)
        module = Module(filePath: modelPath)
        try module.load("forward")
    }

    /// Top-k labels with softmax probabilities, best first.
    public func classify(_ image: CGImage, k: Int = 3) throws -> [Category] {
        Preprocessing.topK(try outputs(image), labels: labels, k: k)
    }

    /// Raw outputs, one per label: see ModelSpec.outputKind (an int8 .pte takes float32 and quantizes inside).
    public func outputs(_ image: CGImage) throws -> [Float] {
        let x = Preprocessing.normalize(Preprocessing.rgbaPixels(image))
        let input = Tensor<Float>(x, shape: [1, ModelSpec.inputHeight, ModelSpec.inputWidth, 3])
        let outputs = try module.forward(input)
        guard let logits: Tensor<Float> = outputs.first?.tensor() else {
            throw NSError(domain: "EdgeTLClassifier", code: 2, userInfo: [NSLocalizedDescriptionKey: "no tensor output"])
        }
        return logits.scalars()
    }
}
