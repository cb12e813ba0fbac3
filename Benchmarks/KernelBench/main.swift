// Times the fused merge kernel alone: W' = round(W + L·R) on bf16 weights, in GB/s of weights
// processed (read + written) and GFLOP/s of the update (2·rows·cols·k).
//
//   swift run -c release adapter-kernel-bench [threads]
import AdapterKit
import Dispatch

let threads = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 2 : 2
print("shape\trank\tthreads\tseconds\tGB/s\tGFLOP/s\tvectorised")
for (rows, cols) in [(4096, 4096), (11008, 4096)] {
    for k in [8, 16, 64] {
        let n = rows * cols
        var w = [UInt16](repeating: 0, count: n)
        var x: UInt32 = 12345
        for i in 0..<n {
            x = x &* 1_664_525 &+ 1_013_904_223
            w[i] = UInt16(0x3C00 | (x >> 22))  // bf16 values in [2^-7, 2^-6)
        }
        var out = [UInt16](repeating: 0, count: n)
        let l = (0..<(rows * k)).map { Double($0 % 7) * 1e-3 }
        let r = (0..<(k * cols)).map { Double($0 % 5) * 1e-3 }
        var best = Double.infinity
        for _ in 0..<5 {
            let start = DispatchTime.now().uptimeNanoseconds
            let ok = w.withUnsafeBytes { src in
                out.withUnsafeMutableBytes { dst in
                    LowRankUpdate.apply(source: src.baseAddress!, destination: dst.baseAddress!, dtype: .bf16, rows: rows, cols: cols,
                                        l: l, r: r, k: k, threads: threads)
                }
            }
            precondition(ok)
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
        }
        // Conversion of L and R to the kernel's layout is part of each call and of the time.
        let gbs = Double(n * 4) / best / 1e9
        let gflops = 2 * Double(n) * Double(k) / best / 1e9
        print("\(rows)x\(cols)\t\(k)\t\(threads)\t\(formatFixed(best, 4))\t\(formatFixed(gbs, 2))\t\(formatFixed(gflops, 1))\t\(LowRankUpdate.isVectorised)")
    }
}
