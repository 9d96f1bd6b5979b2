import Foundation

/// The edgert files inside a `.mlpackage` (Foundation only, so it works and is tested
/// anywhere): the manifest, its raw bytes (the compiled-model cache key) and the tokenizer.
public struct PackageFiles: Sendable {
    /// The `.mlpackage` folder.
    public let package: URL
    /// `<pkg>/Data/com.edgert`: the manifest and `tokenizer/`.
    public let folder: URL
    public let manifest: Manifest
    /// The manifest file's bytes, as written at export.
    public let manifestData: Data

    /// Read and validate the manifest of the package at `package`.
    public init(package: URL) throws {
        self.package = package
        folder = PackageLayout.itemFolder.reduce(package) { $0.appendingPathComponent($1) }
        let url = folder.appendingPathComponent(PackageLayout.manifestFile)
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw EdgertError.missingFile(url.path)
        }
        manifestData = data
        manifest = try Manifest.decode(from: data)
    }

    /// The package's tokenizer (`tokenizer.json` and `tokenizer_config.json` of the manifest).
    public func tokenizer() throws -> BPETokenizer {
        guard let file = manifest.tokenizerJSON else {
            throw EdgertError.manifest("the package lists no tokenizer.json")
        }
        let json = folder.appendingPathComponent(file)
        return try BPETokenizer(
            tokenizerJSON: json,
            config: json.deletingLastPathComponent().appendingPathComponent("tokenizer_config.json"))
    }
}
