// swift-tools-version:6.0
// EdgertBridge: run an edgert Core ML package from an iOS 18 / macOS 15 app.
//
//   EdgertCore    Foundation only, builds and is tested on Linux: the manifest contract, the
//                 tokenizer (the package's tokenizer.json), the chat format, sampling, the
//                 streaming detokenizer and the generation loop over `LanguageModel`.
//   EdgertBridge  Core ML (compiled where CoreML exists): `CoreMLLanguageModel`, the package's
//                 prefill / decode functions and states; re-exports EdgertCore.
//
// The contract with the Python converter is the manifest (Data/com.edgert/manifest.json inside
// the .mlpackage, also in the model's metadata). No outside packages: builds offline.
import PackageDescription

let package = Package(
    name: "EdgertBridge",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "EdgertBridge", targets: ["EdgertBridge"]),
        .library(name: "EdgertCore", targets: ["EdgertCore"]),
    ],
    targets: [
        .target(name: "EdgertCore", path: "Sources/EdgertCore"),
        .target(name: "EdgertBridge", dependencies: ["EdgertCore"], path: "Sources/EdgertBridge"),
        .testTarget(name: "EdgertCoreTests", dependencies: ["EdgertCore"],
                    path: "Tests/EdgertCoreTests"),
        .testTarget(name: "EdgertBridgeTests", dependencies: ["EdgertBridge"],
                    path: "Tests/EdgertBridgeTests"),
    ],
    swiftLanguageModes: [.v6]
)
