// swift-tools-version:6.0
// EdgertBridge: run an edgert Core ML package (stateful KV cache, prefill + decode functions)
// from an iOS 18 / macOS 15 app. The contract with the Python converter is the manifest
// (Data/com.edgert/manifest.json inside the .mlpackage, also in the model's metadata).
import PackageDescription

let package = Package(
    name: "EdgertBridge",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "EdgertBridge", targets: ["EdgertBridge"]),
    ],
    targets: [
        .target(name: "EdgertBridge", path: "Sources/EdgertBridge"),
        .testTarget(name: "EdgertBridgeTests", dependencies: ["EdgertBridge"],
                    path: "Tests/EdgertBridgeTests"),
    ],
    swiftLanguageModes: [.v5]
)
