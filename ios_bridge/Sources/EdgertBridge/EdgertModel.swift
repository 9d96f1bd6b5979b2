import CoreML
import Foundation

/// An edgert Core ML package loaded for generation: its `prefill` and `decode` functions (one
/// MLModel each, sharing the weights) and its manifest.
public final class EdgertModel {
    public let manifest: Manifest
    public let prefillModel: MLModel
    public let decodeModel: MLModel
    /// The folder of the tokenizer files the manifest lists (nil for a bare `.mlmodelc`:
    /// bundle the files from the `.mlpackage` with the app then).
    public let tokenizerFolder: URL?

    init(manifest: Manifest, prefill: MLModel, decode: MLModel, tokenizerFolder: URL?) {
        self.manifest = manifest
        prefillModel = prefill
        decodeModel = decode
        self.tokenizerFolder = tokenizerFolder
    }

    /// Load a `.mlpackage` (compiled on the device first) or a compiled `.mlmodelc`.
    /// The manifest comes from `Data/com.edgert/manifest.json`, else from the model's metadata.
    public static func load(_ url: URL, computeUnits: MLComputeUnits = .all) async throws
        -> EdgertModel
    {
        var compiled = url
        var manifestData: Data? = nil
        var tokenizerFolder: URL? = nil
        if url.pathExtension == "mlpackage" {
            let folder = PackageLayout.itemFolder.reduce(url) { $0.appendingPathComponent($1) }
            let manifestURL = folder.appendingPathComponent(PackageLayout.manifestFile)
            guard FileManager.default.fileExists(atPath: manifestURL.path) else {
                throw EdgertError.missingFile(manifestURL)
            }
            manifestData = try Data(contentsOf: manifestURL)
            tokenizerFolder = folder
            compiled = try await MLModel.compileModel(at: url)
        }
        let prefill = try await loadFunction(IONames.prefill, at: compiled, computeUnits)
        let decode = try await loadFunction(IONames.decode, at: compiled, computeUnits)
        if manifestData == nil {
            let metadata = decode.modelDescription.metadata[MLModelMetadataKey.creatorDefinedKey]
            if let values = metadata as? [String: String],
               let json = values[PackageLayout.metadataKey]
            {
                manifestData = json.data(using: .utf8)
            }
        }
        guard let data = manifestData else {
            throw EdgertError.manifest("\(url.lastPathComponent) carries no edgert manifest")
        }
        let manifest = try Manifest.decode(from: data)
        return EdgertModel(manifest: manifest, prefill: prefill, decode: decode,
                           tokenizerFolder: tokenizerFolder)
    }

    static func loadFunction(_ name: String, at url: URL, _ computeUnits: MLComputeUnits)
        async throws -> MLModel
    {
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        configuration.functionName = name
        return try await MLModel.load(contentsOf: url, configuration: configuration)
    }

    /// A fresh, zeroed KV cache (`key_cache`, `value_cache`), used by both functions.
    public func makeState() -> MLState {
        decodeModel.makeState()
    }

    /// The logits (vocab_size floats) after `tokens`, which go into the cache at `position`.
    /// One token runs `decode`; more run `prefill` (at most `manifest.prefillMaxLength`).
    public func predict(_ tokens: [Int], position: Int, state: MLState) throws -> [Float] {
        let count = tokens.count
        guard count >= 1, count <= manifest.prefillMaxLength else {
            throw EdgertError.prediction("\(count) tokens in one call")
        }
        guard position + count <= manifest.contextLength else {
            throw EdgertError.contextFull(needed: position + count,
                                          context: manifest.contextLength)
        }
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            IONames.inputIDs: MLFeatureValue(multiArray: try EdgertModel.inputIDs(tokens)),
            IONames.position: MLFeatureValue(multiArray: try EdgertModel.position(position)),
            IONames.causalMask: MLFeatureValue(multiArray: try causalMask(position, count)),
        ])
        let function = count == 1 ? decodeModel : prefillModel
        let output = try function.prediction(from: inputs, using: state)
        guard let logits = output.featureValue(for: IONames.logits)?.multiArrayValue else {
            throw EdgertError.prediction("no \(IONames.logits) output")
        }
        return EdgertModel.lastRow(logits)
    }

    // MARK: - Inputs and outputs

    /// input_ids (1, L) int32.
    static func inputIDs(_ tokens: [Int]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            for (i, token) in tokens.enumerated() {
                buffer[i * strides[1]] = Int32(token)
            }
        }
        return array
    }

    /// position (1,) int32: the cache slot of the first token.
    static func position(_ position: Int) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [1], dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
            buffer[0] = Int32(position)
        }
        return array
    }

    /// causal_mask (1, 1, L, context) fp16: row i sees keys j <= position + i.
    func causalMask(_ position: Int, _ count: Int) throws -> MLMultiArray {
        let context = manifest.contextLength
        let shape = [1, 1, count, context].map { NSNumber(value: $0) }
        let array = try MLMultiArray(shape: shape, dataType: .float16)
        let visible = EdgertModel.halfBits(manifest.causalMask.visibleValue)
        let masked = EdgertModel.halfBits(manifest.causalMask.maskedValue)
        array.withUnsafeMutableBytes { raw, strides in
            let halves = raw.bindMemory(to: UInt16.self)
            for i in 0..<count {
                for j in 0..<context {
                    halves[i * strides[2] + j * strides[3]] = j <= position + i ? visible : masked
                }
            }
        }
        return array
    }

    /// The logits (1, 1, vocab) float32 as an array.
    static func lastRow(_ logits: MLMultiArray) -> [Float] {
        let n = logits.shape[logits.shape.count - 1].intValue
        let stride = logits.strides[logits.strides.count - 1].intValue
        return logits.withUnsafeBufferPointer(ofType: Float.self) { buffer in
            (0..<n).map { buffer[$0 * stride] }
        }
    }

    /// IEEE half-precision bits of `value`, rounded to nearest (the mask's 0 and -1e4).
    static func halfBits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (bits >> 16) & 0x8000)
        let exponent = Int((bits >> 23) & 0xFF) - 127 + 15
        if exponent <= 0 {
            return sign  // zero, or too small for a normal half: signed zero
        }
        if exponent >= 31 {
            return sign | 0x7C00  // infinity
        }
        let combined = (UInt32(exponent) << 23 | (bits & 0x7F_FFFF)) + 0x1000
        let half = min(combined >> 13, 0x7C00)
        return sign | UInt16(truncatingIfNeeded: half)
    }
}
