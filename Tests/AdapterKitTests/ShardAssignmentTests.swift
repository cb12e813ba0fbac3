import Testing
@testable import AdapterKit

@Suite("Split merges: shard assignment and part names")
struct ShardAssignmentTests {
    @Test("largest first to the lightest part, lower index on ties (worked by hand)")
    func byHand() {
        // 5 → p1; 4 → p2; 3 → p2 (4 < 5); 2 → p1 (5 < 7); 1 → p1 (7 = 7, lower index).
        #expect(MergePlan.assignShards(sizes: [5, 1, 4, 2, 3], parts: 2) == [[0, 1, 3], [2, 4]])
        #expect(MergePlan.assignShards(sizes: [5, 1, 4, 2, 3], parts: 1) == [[0, 1, 2, 3, 4]])
        // Equal shards go round the parts in order; more parts than shards leave parts empty.
        #expect(MergePlan.assignShards(sizes: [7, 7, 7], parts: 2) == [[0, 2], [1]])
        #expect(MergePlan.assignShards(sizes: [3, 9], parts: 4) == [[1], [0], [], []])
        #expect(MergePlan.assignShards(sizes: [], parts: 3) == [[], [], []])
    }

    @Test("every shard in exactly one part; no part exceeds the lightest by more than the largest shard")
    func balanced() {
        var rng = SeededGenerator(seed: 3)
        for _ in 0..<50 {
            let sizes = (0..<Int(rng.next() % 40)).map { _ in Int(rng.next() % 1000) + 1 }
            let parts = Int(rng.next() % 9) + 1
            let a = MergePlan.assignShards(sizes: sizes, parts: parts)
            #expect(a.flatMap { $0 }.sorted() == Array(sizes.indices))
            let loads = a.map { $0.reduce(0) { $0 + sizes[$1] } }
            #expect(loads.max()! - loads.min()! <= (sizes.max() ?? 0))
            #expect(a.allSatisfy { $0 == $0.sorted() })
        }
    }

    @Test("I/N is read strictly")
    func parsing() {
        #expect(MergePart("2/7") == MergePart(index: 2, count: 7))
        for bad in ["0/1", "2/1", "1/0", "/", "1/", "/2", "1/2/3", "+1/2", " 1/2", "1 /2", "١/٢"] {
            #expect(MergePart(bad) == nil, "\(bad)")
        }
        #expect(PartManifest.part(fromFileName: "part-3-of-12.json") == MergePart(index: 3, count: 12))
        #expect(PartManifest.part(fromFileName: "part-3-of-2.json") == nil)
        #expect(PartManifest.part(fromFileName: ".part-1-of-2.json.adapter-tmp-1-0000") == nil)
    }
}
