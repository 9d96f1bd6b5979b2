import EdgertCore
import Foundation
import XCTest

final class ManifestTests: XCTestCase {
    func testExportedManifestDecodesAndValidates() throws {
        let manifest = try Fixture.manifest()
        XCTAssertEqual(manifest.format, PackageLayout.format)
        XCTAssertEqual(manifest.formatVersion, 2)
        XCTAssertEqual(manifest.functions.keys.sorted(), [IONames.decode, IONames.prefill])
        XCTAssertEqual(manifest.states.map(\.name), [IONames.keyCache, IONames.valueCache])
        XCTAssertEqual(manifest.states.first?.shape,
                       [manifest.numHiddenLayers, manifest.numKeyValueHeads, manifest.contextLength,
                        manifest.headDim])
        XCTAssertTrue(manifest.statesCanRewind)
        let kv = manifest.states.first!
        XCTAssertEqual(kv.bytes, 2 * kv.shape.reduce(1, *))  // float16
        XCTAssertEqual(manifest.stateMemoryBytes, 2 * kv.byteCount)
        XCTAssertEqual(manifest.prefillMaxLength, min(manifest.contextLength, 512))
        XCTAssertEqual(manifest.chatFormat?.type, "role_affixes")
        XCTAssertEqual(manifest.weightsSha256?.count, 64)
        XCTAssertEqual(manifest.vocabSize, 49152)
        let tokenizer = try Fixture.manifestFolder().appendingPathComponent(manifest.tokenizerJSON ?? "-")
        XCTAssertTrue(FileManager.default.fileExists(atPath: tokenizer.path))
    }

    /// A hybrid model's manifest: recurrent states beside the KV cache, so the state cannot
    /// rewind, and its memory counts every state.
    func testRecurrentStatesDecode() throws {
        let url = try Fixture.manifestFolder().appendingPathComponent(PackageLayout.manifestFile)
        var m = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        let recurrent: [[String: Any]] = [
            ["name": "conv_state", "shape": [2, 3, 128], "dtype": "float16", "kind": "recurrent",
             "bytes": 1536],
            ["name": "delta_state", "shape": [2, 4, 16, 16], "dtype": "float16",
             "kind": "recurrent"],  // no bytes: counted from the shape
        ]
        var f = m["functions"] as! [String: [String: Any]]
        for name in [IONames.prefill, IONames.decode] {
            f[name]!["states"] = (f[name]!["states"] as! [[String: Any]]) + recurrent
        }
        m["functions"] = f
        let manifest = try Manifest.decode(from: JSONSerialization.data(withJSONObject: m))
        XCTAssertEqual(manifest.states.map(\.name),
                       [IONames.keyCache, IONames.valueCache, "conv_state", "delta_state"])
        XCTAssertFalse(manifest.statesCanRewind)
        let kv = manifest.states[0].byteCount
        XCTAssertEqual(manifest.stateMemoryBytes, 2 * kv + 1536 + 2 * 2 * 4 * 16 * 16)
    }

    /// A Gemma 4 manifest's shape: sliding-window states beside the KV cache (no rewinding),
    /// and an extra input whose rows come from a table file of the package.
    func testWindowStatesAndSourcedInputsDecode() throws {
        let url = try Fixture.manifestFolder().appendingPathComponent(PackageLayout.manifestFile)
        var m = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        let window: [String: Any] = ["name": "sliding_key_cache", "shape": [4, 2, 512, 256],
                                     "dtype": "float16", "kind": "window"]
        let rows: [String: Any] = [
            "name": "per_layer_embeddings", "shape": [1, -1, 8960], "dtype": "float16",
            "source": ["kind": "embedding_rows", "path": "model-per-layer-embeddings.safetensors",
                       "tensor": "model.embed_tokens_per_layer", "ids": "input_ids",
                       "shape": [262144, 8960], "bytes": 1234,
                       "quantization": ["bits": 4, "group_size": 32, "mode": "affine"]] as [String: Any],
        ]
        var f = m["functions"] as! [String: [String: Any]]
        for name in [IONames.prefill, IONames.decode] {
            f[name]!["states"] = (f[name]!["states"] as! [[String: Any]]) + [window]
            f[name]!["inputs"] = (f[name]!["inputs"] as! [[String: Any]]) + [rows]
        }
        m["functions"] = f
        let manifest = try Manifest.decode(from: JSONSerialization.data(withJSONObject: m))
        XCTAssertFalse(manifest.statesCanRewind)
        let source = try XCTUnwrap(manifest.functions[IONames.decode]?.inputs.last?.source)
        XCTAssertEqual(source.shape, [262144, 8960])
        XCTAssertEqual(source.quantization, Manifest.Quantization(bits: 4, groupSize: 32))
        XCTAssertEqual(source.tensor, "model.embed_tokens_per_layer")
    }

    /// Each broken manifest is refused with a description naming the problem.
    func testBrokenManifestsAreRefused() throws {
        let url = try Fixture.manifestFolder().appendingPathComponent(PackageLayout.manifestFile)
        let good = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        func refused(_ change: (inout [String: Any]) -> Void, _ expected: String) throws {
            var m = good
            change(&m)
            let data = try JSONSerialization.data(withJSONObject: m)
            XCTAssertThrowsError(try Manifest.decode(from: data)) { error in
                let text = (error as? LocalizedError)?.errorDescription ?? ""
                XCTAssertTrue(text.contains(expected), "\(text) lacks \(expected)")
            }
        }
        try refused({ $0["format"] = "other" }, "format other")
        try refused({ $0["format_version"] = 99 }, "newer than this bridge reads")
        try refused({ $0["context_length"] = nil }, "no field contextLength")
        try refused({ m in
            var f = m["functions"] as! [String: Any]
            f["prefill"] = nil
            m["functions"] = f
        }, "no function prefill")
        try refused({ m in
            var f = m["functions"] as! [String: [String: Any]]
            var states = f["decode"]!["states"] as! [[String: Any]]
            states[0]["kind"] = "mystery"
            f["decode"]!["states"] = states
            m["functions"] = f
        }, "unknown kind mystery")
        try refused({ m in
            var f = m["functions"] as! [String: [String: Any]]
            var states = f["decode"]!["states"] as! [[String: Any]]
            states[0]["dtype"] = "float32"
            f["decode"]!["states"] = states
            m["functions"] = f
        }, "has dtype float32, expected float16")
        try refused({ m in
            var f = m["functions"] as! [String: [String: Any]]
            var inputs = f["decode"]!["inputs"] as! [[String: Any]]
            inputs.append(["name": "per_layer_inputs", "shape": [1], "dtype": "float16"])
            f["decode"]!["inputs"] = inputs
            m["functions"] = f
        }, "input per_layer_inputs has no source")
    }

    /// Room for what other models add: recurrent states (not rewindable) and an extra input
    /// read from a file.
    func testRecurrentStatesAndExtraInputsDecode() throws {
        let url = try Fixture.manifestFolder().appendingPathComponent(PackageLayout.manifestFile)
        var m = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        var f = m["functions"] as! [String: [String: Any]]
        for name in ["prefill", "decode"] {
            var states = f[name]!["states"] as! [[String: Any]]
            states.append(["name": "conv_state", "shape": [2, 8], "dtype": "float16", "kind": "recurrent"])
            f[name]!["states"] = states
            var inputs = f[name]!["inputs"] as! [[String: Any]]
            inputs.append(["name": "per_layer_inputs", "shape": [1, -1, 64], "dtype": "float16",
                           "source": ["kind": "embedding_file", "path": "per_layer.bin"]])
            f[name]!["inputs"] = inputs
        }
        m["functions"] = f
        let manifest = try Manifest.decode(from: JSONSerialization.data(withJSONObject: m))
        XCTAssertFalse(manifest.statesCanRewind)
        XCTAssertEqual(manifest.functions["decode"]?.inputs.last?.source?.kind, "embedding_file")
    }

    func testErrorsDescribeThemselves() {
        let errors: [EdgertError] = [.manifest("x"), .missingFile("/a"), .tokenizer("t"),
                                     .chatFormat("c"), .contextFull(needed: 9, context: 8),
                                     .prediction("p"), .emptyPrompt, .busy]
        for e in errors {
            XCTAssertFalse(e.localizedDescription.isEmpty)
            XCTAssertFalse(e.localizedDescription.contains("\n"))
        }
        XCTAssertEqual(EdgertError.contextFull(needed: 9, context: 8).localizedDescription,
                       "9 tokens do not fit the package's context of 8")
    }
}

final class PackageFilesTests: XCTestCase {
    /// What EdgertPackage.load reads before Core ML: the manifest and tokenizer of a .mlpackage.
    func testPackageFilesReadTheExport() throws {
        let files = try PackageFiles(package: Fixture.url("EDGERT_TEST_PACKAGE"))
        XCTAssertEqual(files.manifest.vocabSize, 49152)
        XCTAssertFalse(files.manifestData.isEmpty)
        let tokenizer = try files.tokenizer()
        XCTAssertEqual(tokenizer.encode("<|im_start|>hi<|im_end|>"), [1, 6004, 2])
        XCTAssertThrowsError(try PackageFiles(package: URL(fileURLWithPath: "/nonexistent.mlpackage")))
    }

    func testHalfFloatBits() {
        XCTAssertEqual(HalfFloat.bits(0), 0x0000)
        XCTAssertEqual(HalfFloat.bits(1), 0x3C00)
        XCTAssertEqual(HalfFloat.bits(-2), 0xC000)
        XCTAssertEqual(HalfFloat.bits(-1e4), 0xF0E2)  // the mask value
        XCTAssertEqual(HalfFloat.bits(1e6), 0x7C00)
        XCTAssertEqual(HalfFloat.bits(1e-9), 0x0000)
    }
}
