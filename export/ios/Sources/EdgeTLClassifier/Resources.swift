// Part of the edgetl bundle: where the model, labels and preprocess.json are, under SwiftPM or CocoaPods.
import Foundation

private final class BundleToken {}

extension Bundle {
    static var edgetlResources: Bundle {
        #if SWIFT_PACKAGE
        return Bundle.module
        #else
        let host = Bundle(for: BundleToken.self)
        if let url = host.url(forResource: "EdgeTLClassifier", withExtension: "bundle"), let bundle = Bundle(url: url) {
            return bundle
        }
        return host
        #endif
    }
}
