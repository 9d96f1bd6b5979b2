import EdgertCore
import Foundation
import XCTest

final class DetokenizerTests: XCTestCase {
    /// Streams `ids`; after each token the text emitted so far, plus what `finish()` would
    /// release then (a copy of the detokenizer finishes), is exactly the full decode of the
    /// prefix. Returns how many characters each step held back.
    func checkStream(_ tok: BPETokenizer, _ ids: [Int], _ label: String) -> [Int] {
        var detokenizer = tok.makeDetokenizer(skipSpecialTokens: false)
        var emitted = ""
        var held: [Int] = []
        for k in 1...max(ids.count, 1) where !ids.isEmpty {
            emitted += detokenizer.add(ids[k - 1])
            var copy = detokenizer
            let full = tok.decode(Array(ids[..<k]))
            XCTAssertSameText(emitted + copy.finish(), full, "\(label) prefix \(k)")
            held.append(full.unicodeScalars.count - emitted.unicodeScalars.count)
        }
        return held
    }

    func testStreamEqualsFullDecodeOnEveryPrefix() throws {
        for name in tokenizerNames {
            let (tok, folder) = try loadTokenizer(name)
            let cases = try Fixture.decode(TokenizerCases.self, folder.appendingPathComponent("cases.json"))
            for c in cases.strings {
                let held = checkStream(tok, c.idsPlain, "\(name) \(c.text.debugDescription)")
                if name == "smollm" {  // never stalls: at most an unfinished character held
                    XCTAssertLessThanOrEqual(held.max() ?? 0, 3, c.text.debugDescription)
                } else {  // after any token but a <0xXX> byte, nothing is held
                    for (k, h) in held.enumerated() where !(tok.token(c.idsPlain[k]) ?? "").hasPrefix("<0x") {
                        XCTAssertEqual(h, 0, "\(name) \(c.text.debugDescription) token \(k)")
                    }
                }
            }
            for c in cases.random {
                _ = checkStream(tok, c.ids, "\(name) \(c.ids)")
            }
        }
    }

    /// transformers' cleanup (" ." -> ".") changes text already decoded when the next token
    /// comes: the detokenizer holds back what a cleanup may still change, and keeps going
    /// (a re-decode no longer starts with the text emitted: the old detokenizer stopped).
    func testCleanupCaseStreamsExactly() throws {
        struct Cases: Decodable {
            struct Case: Decodable {
                let text: String
                let ids: [Int]
                let decoded: String
            }
            let cleanup: [Case]
        }
        let (tok, folder) = try loadTokenizer("smollm-cleanup")
        XCTAssertTrue(tok.cleanUpTokenizationSpaces)
        let cases = try Fixture.decode(Cases.self, folder.appendingPathComponent("cases.json"))
        for c in cases.cleanup {
            XCTAssertSameText(tok.decode(c.ids), c.decoded, c.text)  // transformers' decode
            let held = checkStream(tok, c.ids, c.text)
            XCTAssertLessThanOrEqual(held.max() ?? 0, 3, c.text)
            XCTAssertEqual(held.last, 0, "finished text is out once the stream ends cleanly")
        }
        let last = try XCTUnwrap(cases.cleanup.last)  // "end ." -> "end."
        var detokenizer = tok.makeDetokenizer(skipSpecialTokens: false)
        let pieces = last.ids.map { detokenizer.add($0) } + [detokenizer.finish()]
        XCTAssertSameText(pieces.joined(), "end.")
        XCTAssertFalse(pieces.dropLast().joined().hasSuffix(" "))
    }
}
