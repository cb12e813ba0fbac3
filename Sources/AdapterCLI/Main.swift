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
        version: "0.1.0",
        subcommands: [Inspect.self, Merge.self, Convert.self, Resize.self]
    )

    static func main() {
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
        } catch where String(reflecting: type(of: error)).hasPrefix("ArgumentParser.") {
            // Help requested of a command without its own run, or a parse-level error.
            exitForParser(error)
        } catch let interrupted as OutputInterrupted {
            // A signal during a commit, acted on once OUT was consistent again.
            writeError("adapter: " + interrupted.message)
            Foundation.exit(128 + interrupted.signal)
        } catch {
            // If a signal's cleanup is under way (this error may be its doing), this waits for it
            // to report and end the process.
            TemporaryOutputRegistry.shared.removeAll()
            writeError("adapter: error: \(oneLine(String(describing: error)))")
            Foundation.exit(1)
        }
    }
}

extension AdapterCommand {
    /// Help and version exit 0 on stdout; every other argument error is usage: status 2.
    static func exitForParser(_ error: Error) -> Never {
        if exitCode(for: error) == .success {
            print(fullMessage(for: error))
            Foundation.exit(0)
        }
        writeError(fullMessage(for: error))
        Foundation.exit(2)
    }
}

/// Writes one line to standard error.
func writeError(_ message: String) {
    FileHandle.standardError.write(Data((message.hasSuffix("\n") ? message : message + "\n").utf8))
}

func oneLine(_ s: String) -> String {
    s.split(whereSeparator: \.isNewline).joined(separator: " ")
}
