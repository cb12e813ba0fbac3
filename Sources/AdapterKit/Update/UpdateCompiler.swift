/// Turns the terms on a piece of a tensor's rows into the kernel's factors: W' = W + L·R with
/// L (rows × K) and R (K × cols) in Float64, K the sum of the terms' ranks. This is the one place
/// where orientation is resolved for a merge: a transposed layer (GPT-2 Conv1D, embeddings) holds
/// (B·M·A)ᵀ, so its rows index A's inputs and its columns B's outputs.
enum UpdateCompiler {
    /// - Parameters:
    ///   - rows: the rows of the tensor's view to cover; every term must cover all of them.
    ///   - viewRows: the view's row count (what `.all` means).
    static func factors(_ terms: [MergeTerm], rows: Range<Int>, viewRows: Int, cols: Int, tensor: String) throws
        -> (l: [Double], r: [Double], k: Int)
    {
        let n = rows.count
        let k = terms.reduce(0) { $0 + $1.module.rank }
        var l = [Double](repeating: 0, count: n * k)
        var r = [Double](repeating: 0, count: k * cols)
        var offset = 0
        for term in terms {
            let m = term.module
            let rank = m.rank
            let placed = term.rows.rows(of: viewRows)
            precondition(placed.lowerBound <= rows.lowerBound && rows.upperBound <= placed.upperBound, "a term must cover the rows it is compiled for")
            let termRows = placed.count
            let first = rows.lowerBound - placed.lowerBound  // the piece's first row within the term's rows
            // The term's columns in the view: all of them, or a strided selection.
            let width = term.columns?.count ?? cols
            let column = term.columns ?? .all(cols)
            precondition(column.isWithin(cols), "a term's columns must lie inside the view")
            let (ma, b) = try m.mixedA()  // M·A formed once per module
            // The factors are copied out: drop their mapped pages, so memory stays flat however
            // large the adapter is.
            for t in [m.a, m.b] + (m.mixer.map { [$0] } ?? []) { t.release() }
            for v in ma + b where !v.isFinite {
                throw MergeError(tensor: tensor, problem: "module \(m.name) has NaN or infinite factors")
            }
            if term.holdsTranspose {
                // Rows index A's inputs (termRows of them), columns B's outputs (width of them).
                for i in 0..<n { for t in 0..<rank { l[i * k + offset + t] = ma[t * termRows + first + i] } }
                for t in 0..<rank { for j in 0..<width { r[(offset + t) * cols + column[j]] = term.factor * b[j * rank + t] } }
            } else {
                for i in 0..<n { for t in 0..<rank { l[i * k + offset + t] = term.factor * b[(first + i) * rank + t] } }
                for t in 0..<rank { for j in 0..<width { r[(offset + t) * cols + column[j]] = ma[t * width + j] } }
            }
            offset += rank
        }
        return (l, r, k)
    }
}
