import Foundation

/// A (rows, columns) table in a safetensors file of the package, memory-mapped, looked up a
/// row at a time: Gemma 4's per-layer embeddings, which the Core ML program takes as an input
/// (`Manifest.InputSource` kind `embedding_rows`) so that the table never counts against the
/// app's memory. The layout is the MLX package's: a float table (F16 / BF16 / F32 `weight`),
/// or MLX affine `weight` (U32, each row a little-endian bitstream, element j at bit j * bits)
/// with `scales` and `biases` per group of columns.
public struct EmbeddingRows: @unchecked Sendable {  // the mapped bytes are only read
    public let rows: Int
    public let columns: Int
    public let quantization: Manifest.Quantization?
    private let data: Data
    private let weight: Slot
    private let scales: Slot?
    private let biases: Slot?

    struct Slot {
        let dtype: String
        let offset: Int  // into the file
        let count: Int  // elements
    }

    /// Map `file` and check that it holds `tensor`'s table of `rows` x `columns` as
    /// `quantization` says (nil: float), with every byte the header promises.
    public init(file: URL, tensor: String, rows: Int, columns: Int,
                quantization: Manifest.Quantization?) throws {
        guard FileManager.default.fileExists(atPath: file.path) else {
            throw EdgertError.missingFile("\(file.path) (the \(tensor) table)")
        }
        let data = try Data(contentsOf: file, options: .alwaysMapped)
        self.rows = rows
        self.columns = columns
        self.quantization = quantization
        self.data = data
        let header = try Self.header(data, file.lastPathComponent)
        func slot(_ leaf: String, _ shape: [Int], _ dtypes: [String]) throws -> Slot {
            let name = "\(tensor).\(leaf)"
            guard let entry = header[name] as? [String: Any], let dtype = entry["dtype"] as? String,
                  dtypes.contains(dtype), let got = entry["shape"] as? [Int],
                  let offsets = entry["data_offsets"] as? [Int], offsets.count == 2 else {
                throw EdgertError.manifest("\(file.lastPathComponent): no usable \(name)")
            }
            guard got == shape else {
                throw EdgertError.manifest("\(file.lastPathComponent): \(name) has shape \(got), " +
                                           "the manifest needs \(shape)")
            }
            let start = 8 + Self.headerLength(data) + offsets[0]
            let count = shape.reduce(1, *)
            let size = dtype == "F32" || dtype == "U32" ? 4 : 2
            guard offsets[1] - offsets[0] == count * size,
                  start + count * size <= data.count else {
                throw EdgertError.manifest("\(file.lastPathComponent): shorter than the \(name) " +
                                           "table it should hold (\(data.count) bytes)")
            }
            return Slot(dtype: dtype, offset: start, count: count)
        }
        if let q = quantization {
            guard [1, 2, 3, 4, 5, 6, 8].contains(q.bits), q.groupSize > 0,
                  columns % q.groupSize == 0, columns * q.bits % 32 == 0,
                  (q.mode ?? "affine") == "affine" else {
                throw EdgertError.manifest("\(tensor): unsupported quantization \(q)")
            }
            let groups = [rows, columns / q.groupSize]
            weight = try slot("weight", [rows, columns * q.bits / 32], ["U32"])
            scales = try slot("scales", groups, ["F16", "BF16", "F32"])
            biases = try slot("biases", groups, ["F16", "BF16", "F32"])
        } else {
            weight = try slot("weight", [rows, columns], ["F16", "BF16", "F32"])
            scales = nil
            biases = nil
        }
    }

    /// The table an `embedding_rows` input names, in the package's manifest folder.
    public init(source: Manifest.InputSource, folder: URL) throws {
        guard source.kind == "embedding_rows", let path = source.path, let tensor = source.tensor,
              let shape = source.shape, shape.count == 2 else {
            throw EdgertError.manifest("input source \(source.kind) is not a table this bridge reads")
        }
        guard !path.split(separator: "/").contains("..") && !path.hasPrefix("/") else {
            throw EdgertError.manifest("input source \(path) lies outside the package")
        }
        try self.init(file: folder.appendingPathComponent(path), tensor: tensor, rows: shape[0],
                      columns: shape[1], quantization: source.quantization)
    }

    static func headerLength(_ data: Data) -> Int {
        data.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
    }

    static func header(_ data: Data, _ name: String) throws -> [String: Any] {
        guard data.count >= 8 else {
            throw EdgertError.manifest("\(name): not a safetensors file (\(data.count) bytes)")
        }
        let n = headerLength(data)
        guard n > 0, 8 + n <= data.count,
              let json = try? JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + n))),
              let header = json as? [String: Any] else {
            throw EdgertError.manifest("\(name): not a safetensors file (bad header)")
        }
        return header
    }

    /// Row `token` as floats (quantized: scale * q + bias in Float, as the Python engine).
    public func row(_ token: Int) throws -> [Float] {
        guard token >= 0, token < rows else {
            throw EdgertError.prediction("token \(token) is outside the \(rows) rows of the table")
        }
        guard let q = quantization, let scales, let biases else {
            return (0..<columns).map { value(weight, token * columns + $0) }
        }
        let words = columns * q.bits / 32
        let groups = columns / q.groupSize
        let mask = UInt64((1 << q.bits) - 1)
        return data.withUnsafeBytes { raw -> [Float] in
            func word(_ i: Int) -> UInt64 {
                UInt64(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: weight.offset + 4 * i,
                                                               as: UInt32.self)))
            }
            var out = [Float](repeating: 0, count: columns)
            for j in 0..<columns {
                let bit = j * q.bits
                let w = token * words + bit / 32
                var bits = word(w)
                if bit % 32 + q.bits > 32 { bits |= word(w + 1) << 32 }
                let code = Float((bits >> UInt64(bit % 32)) & mask)
                let g = token * groups + j / q.groupSize
                out[j] = value(scales, g) * code + value(biases, g)
            }
            return out
        }
    }

    /// The rows of `tokens` as fp16 bits, row after row: the (1, L, columns) input.
    public func halfRows(_ tokens: [Int]) throws -> [UInt16] {
        var out: [UInt16] = []
        out.reserveCapacity(tokens.count * columns)
        for token in tokens {
            out += try row(token).map(HalfFloat.bits)
        }
        return out
    }

    private func value(_ slot: Slot, _ i: Int) -> Float {
        data.withUnsafeBytes { raw in
            switch slot.dtype {
            case "F32":
                return Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(
                    fromByteOffset: slot.offset + 4 * i, as: UInt32.self)))
            case "BF16":
                let b = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: slot.offset + 2 * i,
                                                               as: UInt16.self))
                return Float(bitPattern: UInt32(b) << 16)
            default:
                return HalfFloat.float(UInt16(littleEndian: raw.loadUnaligned(
                    fromByteOffset: slot.offset + 2 * i, as: UInt16.self)))
            }
        }
    }
}
