import Foundation

/// The BPE model of `tokenizer.json`: a vocabulary, merge ranks, byte fallback and unknown
/// token, applied to one pre-tokenized piece at a time as HF tokenizers does.
struct BPEModel: Sendable {
    let vocab: [ExactString: Int]
    let idToToken: [Int: String]
    /// (left id, right id) packed as left << 32 | right -> (rank, merged id)
    let merges: [Int: (rank: Int, id: Int)]
    let unknown: Int?
    let fuseUnknown: Bool
    let byteFallback: Bool
    let ignoreMerges: Bool
    /// `<0xXX>` token of each byte, where the vocabulary has them.
    let byteTokens: [Int?]

    init(_ json: JSON) throws {
        guard json["type"]?.string == "BPE" else {
            throw EdgertError.tokenizer("model \(json["type"]?.string ?? "?") is not supported " +
                                        "(BPE only)")
        }
        for key in ["dropout", "continuing_subword_prefix", "end_of_word_suffix"] {
            if let v = json[key], !v.isNull {
                throw EdgertError.tokenizer("BPE \(key) is not supported")
            }
        }
        guard let pairs = json["vocab"]?.pairs else {
            throw EdgertError.tokenizer("BPE model without a vocabulary")
        }
        var vocab: [ExactString: Int] = [:]
        var idToToken: [Int: String] = [:]
        vocab.reserveCapacity(pairs.count)
        for (token, id) in pairs {
            guard let id = id.int else { throw EdgertError.tokenizer("vocabulary id of \(token)") }
            vocab[ExactString(token)] = id
            idToToken[id] = token
        }
        var merges: [Int: (rank: Int, id: Int)] = [:]
        for (rank, merge) in (json["merges"]?.array ?? []).enumerated() {
            let parts: [String]
            if let s = merge.string {  // "a b": split at the first space after the first character
                guard let space = s.dropFirst().firstIndex(of: " ") else {
                    throw EdgertError.tokenizer("merge \(s) has no space")
                }
                parts = [String(s[..<space]), String(s[s.index(after: space)...])]
            } else {
                parts = (merge.array ?? []).compactMap(\.string)
            }
            guard parts.count == 2, let a = vocab[ExactString(parts[0])],
                  let b = vocab[ExactString(parts[1])],
                  let ab = vocab[ExactString(parts[0] + parts[1])]
            else {
                throw EdgertError.tokenizer("merge \(parts) of tokens outside the vocabulary")
            }
            let key = a << 32 | b
            if merges[key] == nil { merges[key] = (rank, ab) }
        }
        self.vocab = vocab
        self.idToToken = idToToken
        self.merges = merges
        unknown = json["unk_token"]?.string.flatMap { vocab[ExactString($0)] }
        fuseUnknown = json["fuse_unk"]?.bool ?? false
        byteFallback = json["byte_fallback"]?.bool ?? false
        ignoreMerges = json["ignore_merges"]?.bool ?? false
        byteTokens = (0..<256).map { b in
            vocab[ExactString("<0x" + String(format: "%02X", b) + ">")]
        }
    }

    /// The token ids of one pre-tokenized piece.
    func tokenize(_ piece: Scalars) -> [Int] {
        if ignoreMerges, let id = vocab[ExactString(piece.string)] {
            return [id]
        }
        var symbols: [Int] = []
        symbols.reserveCapacity(piece.count)
        var lastWasUnknown = false
        for scalar in piece {
            if let id = vocab[ExactString(String(Character(scalar)))] {
                symbols.append(id)
                lastWasUnknown = false
                continue
            }
            if byteFallback {
                let ids = String(Character(scalar)).utf8.map { byteTokens[Int($0)] }
                if ids.allSatisfy({ $0 != nil }) {
                    symbols += ids.map { $0! }
                    lastWasUnknown = false
                    continue
                }
            }
            if let unk = unknown {
                if !(fuseUnknown && lastWasUnknown) { symbols.append(unk) }
                lastWasUnknown = true
            }
        }
        return merge(symbols)
    }

    /// Apply merges lowest rank first (leftmost on ties) with a heap over a linked list.
    func merge(_ start: [Int]) -> [Int] {
        guard start.count > 1 else { return start }
        var ids = start
        var next = Array(1...ids.count)  // ids.count: none
        var prev = Array(-1..<(ids.count - 1))
        var alive = [Bool](repeating: true, count: ids.count)
        var heap = MergeHeap()
        func push(_ i: Int) {
            let j = next[i]
            guard j < ids.count, let m = merges[ids[i] << 32 | ids[j]] else { return }
            heap.push(MergeCandidate(rank: m.rank, position: i, left: ids[i], right: ids[j],
                                     merged: m.id))
        }
        for i in 0..<(ids.count - 1) { push(i) }
        while let top = heap.pop() {
            let i = top.position
            let j = next[i]
            guard alive[i], j < ids.count, ids[i] == top.left, ids[j] == top.right else {
                continue  // stale: one side has merged since
            }
            ids[i] = top.merged
            alive[j] = false
            next[i] = next[j]
            if next[j] < ids.count { prev[next[j]] = i }
            if prev[i] >= 0 { push(prev[i]) }
            push(i)
        }
        return ids.indices.filter { alive[$0] }.map { ids[$0] }
    }
}

struct MergeCandidate {
    let rank: Int
    let position: Int
    let left: Int
    let right: Int
    let merged: Int

    func before(_ other: MergeCandidate) -> Bool {
        rank != other.rank ? rank < other.rank : position < other.position
    }
}

/// A binary min-heap of merge candidates ordered by (rank, position).
struct MergeHeap {
    private var items: [MergeCandidate] = []

    mutating func push(_ item: MergeCandidate) {
        items.append(item)
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard items[i].before(items[parent]) else { break }
            items.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> MergeCandidate? {
        guard let first = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var best = i
                if l < items.count && items[l].before(items[best]) { best = l }
                if r < items.count && items[r].before(items[best]) { best = r }
                if best == i { break }
                items.swapAt(i, best)
                i = best
            }
        }
        return first
    }
}
