/// Every error the library reports as a refusal of its input or of an operation: one line naming
/// what it concerns (a file, a tensor, a module) and what is wrong. The CLI turns these into
/// `adapter: error: …` and status 1; anything else reaching it is a usage error or a bug.
public protocol AdapterError: Error, Sendable, CustomStringConvertible {}

extension InputError: AdapterError {}
extension MergeError: AdapterError {}
extension ProblemList: AdapterError {}
extension SafetensorsError: AdapterError {}
extension SafetensorsWriteError: AdapterError {}
extension TensorReadError: AdapterError {}
extension ZipError: AdapterError {}
extension SystemError: AdapterError {}
extension OutputInterrupted: AdapterError {}
extension JSONParser.Failure: AdapterError {}
extension PickleError: AdapterError {}
extension PatternCostError: AdapterError {}
