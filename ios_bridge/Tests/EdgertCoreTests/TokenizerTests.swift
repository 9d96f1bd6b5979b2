import EdgertCore
import Foundation
import XCTest

struct TokenizerCases: Decodable {
    struct StringCase: Decodable {
        let text: String
        let ids: [Int]
        let idsPlain: [Int]
        let decoded: String
        let decodedSkip: String
    }

    struct RandomCase: Decodable {
        let ids: [Int]
        let decoded: String
        let decodedSkip: String
    }

    let strings: [StringCase]
    let random: [RandomCase]
}

/// The tokenizers the fixtures hold: SmolLM2's byte-level BPE (the package's files),
/// llama.cpp's llama-spm and Mistral's v3 SentencePiece vocabularies rebuilt as BPE.
let tokenizerNames = ["smollm", "llama-spm", "mistral-v3"]

/// Tokenizers read once per test run (a debug build takes seconds per vocabulary).
final class TokenizerCache: @unchecked Sendable {
    static let shared = TokenizerCache()
    private let lock = NSLock()
    private var loaded: [String: BPETokenizer] = [:]

    func get(_ folder: URL) throws -> BPETokenizer {
        lock.lock()
        defer { lock.unlock() }
        if let t = loaded[folder.path] { return t }
        let t = try BPETokenizer(folder: folder)
        loaded[folder.path] = t
        return t
    }
}

func loadTokenizer(_ name: String) throws -> (BPETokenizer, URL) {
    let folder = try Fixture.url("EDGERT_TEST_TOKENIZERS").appendingPathComponent(name)
    return (try TokenizerCache.shared.get(folder), folder)
}

final class TokenizerTests: XCTestCase {
    /// Ids equal edgert's Python tokenizer's (itself checked against transformers,
    /// sentencepiece and llama.cpp), with and without special tokens; decodes equal its.
    func testIdsAndDecodesEqualPython() throws {
        for name in tokenizerNames {
            let (tok, folder) = try loadTokenizer(name)
            let cases = try Fixture.decode(TokenizerCases.self, folder.appendingPathComponent("cases.json"))
            for c in cases.strings {
                XCTAssertEqual(tok.encode(c.text), c.ids, "\(name): \(c.text.debugDescription)")
                XCTAssertEqual(tok.encode(c.text, addSpecialTokens: false), c.idsPlain,
                               "\(name): \(c.text.debugDescription)")
                XCTAssertSameText(tok.decode(c.idsPlain), c.decoded, name)
                XCTAssertSameText(tok.decode(c.idsPlain, skipSpecialTokens: true), c.decodedSkip, name)
            }
            for c in cases.random {
                XCTAssertSameText(tok.decode(c.ids), c.decoded, "\(name): \(c.ids)")
                XCTAssertSameText(tok.decode(c.ids, skipSpecialTokens: true), c.decodedSkip,
                                  "\(name): \(c.ids)")
            }
        }
    }

    /// Text round-trips: decode(encode(text)) == text wherever Python's does.
    func testDecodeRoundTrips() throws {
        for name in tokenizerNames {
            let (tok, folder) = try loadTokenizer(name)
            let cases = try Fixture.decode(TokenizerCases.self, folder.appendingPathComponent("cases.json"))
            var roundTrips = 0
            for c in cases.strings where c.decoded.utf8.elementsEqual(c.text.utf8) {
                XCTAssertSameText(tok.decode(tok.encode(c.text, addSpecialTokens: false)), c.text, name)
                roundTrips += 1
            }
            XCTAssertGreaterThan(roundTrips, 20, name)
        }
    }

    /// llama.cpp's own expected tokenizations of its llama-spm vocabulary (no BOS, special
    /// tokens read as text).
    func testLlamaCppExpectedTokenizations() throws {
        struct Case: Decodable {
            let text: String
            let ids: [Int]
        }
        let (tok, folder) = try loadTokenizer("llama-spm")
        let cases = try Fixture.decode([Case].self, folder.appendingPathComponent("llama_cpp.json"))
        XCTAssertGreaterThan(cases.count, 40)
        for c in cases {
            XCTAssertEqual(tok.encode(c.text, addSpecialTokens: false, parseSpecialTokens: false),
                           c.ids, c.text.debugDescription)
        }
    }

    func testSpecialsOfThePackageTokenizer() throws {
        let (tok, _) = try loadTokenizer("smollm")
        XCTAssertEqual(tok.encode("<|im_start|>hi<|im_end|>"), [1, 6004, 2])
        XCTAssertEqual(tok.tokenID("<|im_end|>"), 2)
        XCTAssertEqual(tok.vocabularySize, 49152)
        XCTAssertFalse(tok.addBosToken)
        let (spm, _) = try loadTokenizer("llama-spm")
        XCTAssertEqual(spm.encode("Hello world"), [1, 15043, 3186])
        XCTAssertEqual(spm.encode("<s>Hello world"), [1, 15043, 3186])  // BOS written: not twice
    }

    func testUnsupportedTokenizersAreRefused() {
        let wordPiece = #"{"model": {"type": "WordPiece", "vocab": {}}}"#
        XCTAssertThrowsError(try BPETokenizer(tokenizerData: Data(wordPiece.utf8))) { error in
            XCTAssertEqual((error as? EdgertError),
                           .tokenizer("model WordPiece is not supported (BPE only)"))
        }
        XCTAssertThrowsError(try BPETokenizer(tokenizerData: Data("{\"model\": ".utf8)))
    }
}
