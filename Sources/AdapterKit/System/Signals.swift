#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Dispatch

/// What SIGINT, SIGTERM and SIGHUP do: remove the temporaries and exit 128 + N, without ever
/// leaving OUT missing or half-replaced (`TemporaryOutputRegistry.interrupt`).
public enum SignalCleanup {
    nonisolated(unsafe) private static var sources: [DispatchSourceSignal] = []

    /// Installs the handlers; `report` writes the one line that says what happened. A signal the
    /// caller already ignores (`nohup` for SIGHUP, a shell's background job for SIGINT) stays
    /// ignored. Call once, from the main thread, before any output is written.
    public static func install(report: @escaping @Sendable (String) -> Void) {
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            if FileSystem.ignoreSignal(sig) { continue }
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { TemporaryOutputRegistry.shared.interrupt(sig, report: report) }
            source.resume()
            sources.append(source)
        }
    }
}
