// Times the fused merge kernel alone: W' = round(W + L·R) on bf16 weights, in GB/s of weights
// processed (read + written) and GFLOP/s of the update (2·rows·cols·k).
//
//   swift run -c release adapter-kernel-bench [threads]
//
// With `mixer R…`, times the mixer diagnostics instead (exact and estimated) on Kaiming-like R × R
// mixers and prints both, so the estimates' accuracy can be seen at ranks where exact is slow:
//
//   swift run -c release adapter-kernel-bench mixer 1000 2000 [--no-exact]
import AdapterKit
import Dispatch
import Foundation

if CommandLine.arguments.count > 1 && CommandLine.arguments[1] == "mixer" {
    let exact = !CommandLine.arguments.contains("--no-exact")
    print("rank\tmethod\tseconds\t‖MᵀM − I‖_F\tσmin/σmax")
    for r in CommandLine.arguments.dropFirst(2).compactMap({ Int($0) }) {
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        let m = (0..<(r * r)).map { _ -> Double in
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return (Double(x >> 11) * 0x1p-53 * 2 - 1) / Double(r).squareRoot()
        }
        for method in exact ? [MixerDiagnostics.Method.estimated, .exact] : [.estimated] {
            let start = DispatchTime.now().uptimeNanoseconds
            let d = MixerDiagnostics(mixer: m, rank: r, method: method)
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            print("\(r)\t\(method)\t\(formatFixed(seconds, 3))\t\(d.orthogonalityError)\t\(d.conditionRatio)")
        }
    }
    exit(0)
}

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
                    LowRankUpdate.apply(source: src, destination: dst, dtype: .bf16, rows: rows, cols: cols,
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
