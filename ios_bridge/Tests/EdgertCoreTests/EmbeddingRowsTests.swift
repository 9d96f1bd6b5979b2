import EdgertCore
import Foundation
import XCTest

/// The per-layer embedding lookup against rows edgert's Python engine read from the same
/// files (tests/test_ios_bridge.py writes them with the Core ML exporter's file writer, and the
/// expected rows with edgert.mapped_rows, the lookup the Python Core ML engine feeds).
final class EmbeddingRowsTests: XCTestCase {
    struct Case: Decodable {
        let file: String
        let tensor: String
        let rows: Int
        let columns: Int
        let quantization: Manifest.Quantization?
        let tokens: [Int]
        let floats: String
        let halves: String
    }

    func cases() throws -> (URL, [Case]) {
        let folder = try Fixture.url("EDGERT_TEST_ROWS")
        return (folder, try Fixture.decode([Case].self, folder.appendingPathComponent("cases.json")))
    }

    func testRowsMatchPython() throws {
        let (folder, cases) = try cases()
        XCTAssertGreaterThanOrEqual(cases.count, 4)
        for c in cases {
            let table = try EmbeddingRows(file: folder.appendingPathComponent(c.file),
                                          tensor: c.tensor, rows: c.rows, columns: c.columns,
                                          quantization: c.quantization)
            let floats = try Data(contentsOf: folder.appendingPathComponent(c.floats))
                .withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            let halves = try Data(contentsOf: folder.appendingPathComponent(c.halves))
                .withUnsafeBytes { Array($0.bindMemory(to: UInt16.self)) }
            var ours: [Float] = []
            for token in c.tokens {
                ours += try table.row(token)
            }
            XCTAssertEqual(ours.count, floats.count, c.file)
            for (i, (a, b)) in zip(ours, floats).enumerated() where abs(a - b) > 1e-6 * max(1, abs(b)) {
                XCTFail("\(c.file) value \(i): \(a) != \(b)")
                break
            }
            XCTAssertEqual(try table.halfRows(c.tokens), halves, c.file)
        }
    }

    func testBadTablesAreRefused() throws {
        let (folder, cases) = try cases()
        let c = cases[0]
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("rows-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        let data = try Data(contentsOf: folder.appendingPathComponent(c.file))
        let short = tmp.appendingPathComponent("short.safetensors")
        try data.prefix(data.count - 64).write(to: short)
        func refused(_ url: URL, rows: Int, _ expected: String) {
            XCTAssertThrowsError(try EmbeddingRows(file: url, tensor: c.tensor, rows: rows,
                                                   columns: c.columns,
                                                   quantization: c.quantization)) { error in
                let text = (error as? LocalizedError)?.errorDescription ?? ""
                XCTAssertTrue(text.contains(expected), text)
                XCTAssertFalse(text.contains("\n"), text)
            }
        }
        refused(short, rows: c.rows, "shorter than")
        refused(tmp.appendingPathComponent("missing.safetensors"), rows: c.rows, "missing file")
        refused(folder.appendingPathComponent(c.file), rows: c.rows + 1, "has shape")
        let table = try EmbeddingRows(file: folder.appendingPathComponent(c.file), tensor: c.tensor,
                                      rows: c.rows, columns: c.columns, quantization: c.quantization)
        XCTAssertThrowsError(try table.row(c.rows))
    }

    func testHalfBitsRoundToNearestEven() {
        XCTAssertEqual(HalfFloat.bits(1 + 0x1p-11), 0x3C00)  // tie, even stays
        XCTAssertEqual(HalfFloat.bits(1 + 3 * 0x1p-11), 0x3C02)  // tie, odd rounds up
        XCTAssertEqual(HalfFloat.bits(0x1p-24), 0x0001)  // smallest subnormal
        XCTAssertEqual(HalfFloat.bits(0x1p-25), 0x0000)  // a tie to even zero
        XCTAssertEqual(HalfFloat.bits(65520), 0x7C00)  // rounds up to infinity
        XCTAssertEqual(HalfFloat.float(0x3555), Float(0x3555 & 0x3FF + 1024) * 0x1p-12)
    }
}
