import Foundation
import Testing

private func entries(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
}

@Suite("adapter convert and adapter resize (the built binary)")
struct ConvertCommandTests {
    @Test("lora-to-moslora writes a PEFT folder, a summary on stderr, nothing on stdout, no temporaries")
    func loraToMoSLoRA() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try adapter("convert", "lora-to-moslora", "--mixer", "orthogonal", "--seed", "5", fixture("adapters/peft-lora"), dir.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.isEmpty)
        #expect(r.stderr.contains("wrote 4 modules as peft"))
        #expect(entries(dir.file("out")) == ["adapter_config.json", "adapter_model.safetensors"])
        #expect(entries(dir.path) == ["out"])
        let inspect = try adapter("inspect", "--json", dir.file("out"))
        #expect(inspect.status == 0)
        #expect(inspect.stdout.contains("lora_AB") || inspect.stdout.contains("mixer"))
    }

    @Test("every convert subcommand runs on a fixture")
    func subcommands() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let runs: [[String]] = [
            ["convert", "moslora-to-lora", "--fold-into", "b", fixture("adapters/moslora-original"), dir.file("a")],
            ["convert", "to-peft", fixture("adapters/mlx"), dir.file("b")],
            ["convert", "to-mlx", fixture("adapters/moslora-original"), dir.file("c")],
            ["convert", "to-kohya", "--dtype", "BF16", fixture("adapters/peft-lora"), dir.file("d.safetensors")],
            ["convert", "lora-to-moslora", "--mixer-key", "lora_mixer", "--mixer", "kaiming", "--seed", "3", fixture("adapters/peft-lora"), dir.file("e")],
        ]
        for args in runs {
            let r = try adapter(args)
            #expect(r.status == 0, "\(args): \(r.stderr)")
        }
        #expect(entries(dir.path) == ["a", "b", "c", "d.safetensors", "e"])
        #expect(try adapter("convert", "to-mlx", fixture("adapters/moslora-original"), dir.file("f")).stderr.contains("note: mlx-lm has no mixer"))
    }

    @Test("resize prints the energy kept per module on stdout")
    func resize() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try adapter("resize", "--rank", "2", "--form", "moslora", fixture("adapters/moslora-original"), dir.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n")
        #expect(lines.first == "module\trank_before\trank_after\tenergy_kept")
        #expect(lines.count == 11)
        #expect(lines.dropFirst().allSatisfy { $0.split(separator: "\t").count == 4 && $0.contains("\t4\t2\t0.") })
        let q = try adapter("resize", "--quiet", "--keep-energy", "0.5", fixture("adapters/peft-lora"), dir.file("q"))
        #expect(q.status == 0 && q.stderr.isEmpty)
    }

    @Test("refusals are one line on stderr with status 1, and leave nothing behind")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        expectOneLineError(try adapter("convert", "to-mlx", "--component", "unet", "--base", fixture("models/tiny-unet.safetensors"),
                                       fixture("adapters/kohya-unet.safetensors"), dir.file("m")), containing: "is a convolution")
        expectOneLineError(try adapter("convert", "to-peft", fixture("adapters/kohya-unet.safetensors"), dir.file("p")), containing: "--component")
        expectOneLineError(try adapter("convert", "lora-to-moslora", "--mixer", "kaiming", "--min-condition-ratio", "0.999",
                                       fixture("adapters/peft-lora"), dir.file("k")), containing: "badly conditioned")
        expectOneLineError(try adapter("convert", "to-peft", fixture("adapters/peft-unknown"), dir.file("u")), containing: "--drop-unknown")
        expectOneLineError(try adapter("convert", "to-peft", dir.file("missing"), dir.file("x")), containing: "no such file")
        #expect(entries(dir.path).isEmpty)
    }

    @Test("OUT must not exist unless --force, and is never an input")
    func outputRules() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let existing = dir.write("exists", [7])
        expectOneLineError(try adapter("convert", "to-peft", fixture("adapters/peft-lora"), existing), containing: "already exists")
        #expect(FileManager.default.contents(atPath: existing) == Data([7]))
        // --force replaces only what this tool could have written: not a file where a folder goes…
        expectOneLineError(try adapter("convert", "to-peft", "--force", fixture("adapters/peft-lora"), existing), containing: "this is a file")
        #expect(FileManager.default.contents(atPath: existing) == Data([7]))
        // …but an adapter folder.
        let previous = dir.file("previous")
        #expect(try adapter("convert", "to-mlx", "--quiet", fixture("adapters/peft-lora"), previous).status == 0)
        let forced = try adapter("convert", "to-peft", "--force", fixture("adapters/peft-lora"), previous)
        #expect(forced.status == 0, "\(forced.stderr)")
        #expect(entries(previous) == ["adapter_config.json", "adapter_model.safetensors"])
        let before = FileManager.default.contents(atPath: previous + "/adapter_model.safetensors")
        expectOneLineError(try adapter("resize", "--force", "--rank", "2", previous, previous), containing: "is the input")
        expectOneLineError(try adapter("convert", "to-kohya", "--force", previous + "/adapter_model.safetensors", previous), containing: "contains the input")
        #expect(FileManager.default.contents(atPath: previous + "/adapter_model.safetensors") == before)
        #expect(entries(dir.path) == ["exists", "previous"])
    }

    @Test("usage errors exit 2", arguments: [
        ["resize", "in", "out"],
        ["resize", "--rank", "2", "--keep-energy", "0.9", "in", "out"],
        ["resize", "--rank", "0", "in", "out"],
        ["resize", "--keep-energy", "1.5", "in", "out"],
        ["convert", "lora-to-moslora", "--mixer", "random", "in", "out"],
        ["convert", "to-peft", "--dtype", "I8", "in", "out"],
        ["convert", "to-peft", "in"],
    ])
    func usage(_ args: [String]) throws {
        let r = try adapter(args)
        #expect(r.status == 2, "\(args): \(r.status) \(r.stderr)")
        #expect(!r.stderr.isEmpty)
    }
}
