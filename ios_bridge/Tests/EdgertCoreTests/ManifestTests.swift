import XCTest
import EdgertCore

final class SmokeTests: XCTestCase {
    func testArgmax() {
        XCTAssertEqual(Sampler.argmax([0.5, 3, -1, 3]), 1)
    }
}
