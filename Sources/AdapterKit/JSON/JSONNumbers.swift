// JSON numbers as Python's json module writes them, for configs other tools read.

/// A JSON number as Python writes an int or a float: `8`, `2.5`.
func jsonNumber(_ v: Double) -> JSONValue {
    if v.isFinite, v.rounded() == v, abs(v) < 1e15 { return .number(String(Int64(v))) }
    return .number(v.description)
}

func jsonInt(_ v: Int) -> JSONValue { .number(String(v)) }
