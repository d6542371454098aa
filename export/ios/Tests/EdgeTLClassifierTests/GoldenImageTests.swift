// Part of the edgetl bundle: the golden images and what the verified model gave for them on the host.
import CoreGraphics
import ImageIO
import XCTest
@testable import EdgeTLClassifier

final class GoldenImageTests: XCTestCase {
    struct Expected: Decodable {
        struct Entry: Decodable { let index: Int; let label: String; let score: Float }
        struct Image: Decodable { let file: String; let top_k: [Entry] }
        let tolerance: Float
        let images: [Image]
    }

    private func resource(_ name: String) throws -> URL {
        #if SWIFT_PACKAGE
        let bundle = Bundle.module
        #else
        let bundle = Bundle(for: GoldenImageTests.self)
        #endif
        return try XCTUnwrap(bundle.url(forResource: name, withExtension: nil, subdirectory: "golden"))
    }

    func testGoldenImagesGiveTheHostTopK() throws {
        let expected = try JSONDecoder().decode(Expected.self, from: Data(contentsOf: try resource("expected.json")))
        let classifier = try ImageClassifier()
        for image in expected.images {
            let source = try XCTUnwrap(CGImageSourceCreateWithURL(try resource(image.file) as CFURL, nil))
            let cgImage = try XCTUnwrap(CGImageSourceCreateImageAtIndex(source, 0, nil))
            let probabilities = Preprocessing.probabilities(try classifier.outputs(cgImage))
            let got = try classifier.classify(cgImage, k: image.top_k.count)
            XCTAssertEqual(got.first?.index, image.top_k.first?.index, "\(image.file): top-1")
            for entry in image.top_k {
                XCTAssertEqual(probabilities[entry.index], entry.score, accuracy: expected.tolerance, "\(image.file): \(entry.label)")
            }
        }
    }
}
