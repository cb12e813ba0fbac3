import AdapterKit
import ArgumentParser
import Foundation

/// The `adapter` command: parses arguments, calls AdapterKit, prints.
///
/// Exit statuses: 0 success, 1 invalid input or refused operation, 2 bad usage.
@main
struct AdapterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "adapter",
        abstract: "Inspect, merge and convert LoRA and MoSLoRA checkpoints.",
        version: AdapterVersion.string,
        subcommands: [Inspect.self, Merge.self, Convert.self, Resize.self, Extract.self, Combine.self]
    )

    static func main() {
        StandardStreams.prepare()
        SignalCleanup.install { writeError("adapter: " + $0) }
        let command: ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exitForParser(error)
        }
        do {
            var command = command
            try command.run()
        } catch let code as ExitCode {
            Foundation.exit(code.rawValue)
        } catch let interrupted as OutputInterrupted {
            // A signal during a commit, acted on once OUT was consistent again.
            writeError("adapter: " + interrupted.message)
            Foundation.exit(128 + interrupted.signal)
        } catch let parts as PartsNotReady {
            // A split merge that cannot be finished: one line per part that is missing or wrong.
            for line in parts.lines { writeError("adapter: error: \(oneLine(line))") }
            Foundation.exit(1)
        } catch let failure as AdapterError {
            // A refused input or operation: status 1. If a signal's cleanup is under way (this
            // error may be its doing), this waits for it to report and end the process.
            TemporaryOutputRegistry.shared.removeAll()
            if let e = failure as? SystemError, e.path == "standard output" {
                let done = TemporaryOutputRegistry.shared.hasCommitted ? "; the output itself was written completely" : ""
                writeError("adapter: error: cannot write to standard output: \(e.reason)\(done)")
                Foundation.exit(1)
            }
            writeError("adapter: error: \(oneLine(String(describing: failure)))")
            Foundation.exit(1)
        } catch {
            // Not the library's: argument-parser's (help asked of a command without its own
            // run, a validation failure), which it maps to 0 or usage.
            exitForParser(error)
        }
    }
}

extension AdapterCommand {
    /// Help and version exit 0 on stdout; every other argument error is usage: status 2.
    static func exitForParser(_ error: Error) -> Never {
        if exitCode(for: error) == .success {
            do { try writeOutput(fullMessage(for: error)) } catch let e as SystemError {
                writeError("adapter: error: cannot write to standard output: \(e.reason)")
                Foundation.exit(1)
            } catch {
                writeError("adapter: error: \(error)")
                Foundation.exit(1)
            }
            Foundation.exit(0)
        }
        writeError(fullMessage(for: error))
        Foundation.exit(2)
    }
}

/// Writes one line to standard error (dropped if standard error cannot take it).
func writeError(_ message: String) {
    StandardStreams.writeError(message.hasSuffix("\n") ? message : message + "\n")
}

/// Writes one line to standard output; a failure (full disk, closed pipe) is an error of the command.
func writeOutput(_ line: String) throws {
    try StandardStreams.writeOutput(line + "\n")
}

func oneLine(_ s: String) -> String {
    s.split(whereSeparator: \.isNewline).joined(separator: " ")
}
