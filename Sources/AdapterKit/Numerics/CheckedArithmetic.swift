extension Int {
    /// `self + other`, or nil on overflow.
    func addingReportingOverflowChecked(_ other: Int) -> Int? {
        let (v, o) = addingReportingOverflow(other)
        return o ? nil : v
    }

    /// `self * other`, or nil on overflow.
    func multipliedReportingOverflowChecked(_ other: Int) -> Int? {
        let (v, o) = multipliedReportingOverflow(by: other)
        return o ? nil : v
    }
}
