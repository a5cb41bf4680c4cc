// Mirrors bindings/go/rankfuse_test.go. Not run by CI (no Swift toolchain): see README.md.
import Foundation
import XCTest

@testable import Rankfuse

let repo = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent()
let fixture = repo.appendingPathComponent("tests/fixtures/peft-tiny").path

let modules = [0, 1].flatMap { b in
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"].map { "layers.\(b).\($0)" }
}

final class RankfuseTests: XCTestCase {
    func testVersion() throws {
        XCTAssertEqual(abiVersion, headerABIVersion)
        let info = try Runtime(threads: 2).info()
        XCTAssertTrue(info.contains("\"version\":\"\(version)\""), info)
    }

    func testFixtureParity() throws {
        let rt = try Runtime(threads: 2)
        let base = try rt.openWeights(fixture + "/base.safetensors")
        let io = try rt.openWeights(fixture + "/io.safetensors")
        let names = Set(try base.names())
        for name in ["lora-r8", "rslora-pattern", "lora-r64"] {
            let adapter = try rt.loadPEFT(fixture + "/adapters/" + name)
            XCTAssertEqual(adapter.moduleCount, modules.count)
            for m in modules {
                // x as a Swift array (the zero-copy array path); w and bias as mapped views.
                let xv = try io.get("x." + m)
                let x = try Matrix.f32(try xv.floats(), rows: xv.rows, cols: xv.cols)
                let bias = names.contains(m + ".bias") ? try base.get(m + ".bias") : nil
                let y = try rt.linear(x: x, w: try base.get(m + ".weight"), bias: bias,
                                      slots: [Slot(try adapter.module(m))])
                let ref = try io.get("y.\(name).\(m)").floats()
                let got = try y.floats()
                XCTAssertEqual(got.count, ref.count)
                for (g, r) in zip(got, ref) {
                    XCTAssertLessThanOrEqual(abs(g - r), 1e-4 + 1e-4 * abs(r), "\(name) \(m)")
                }
            }
        }
    }

    func testLoraInfo() throws {
        let rt = try Runtime()
        let l = try rt.loadPEFT(fixture + "/adapters/rslora-pattern").module("layers.0.self_attn.q_proj")
        let i = try l.info()
        XCTAssertEqual(i.rank, 4)
        XCTAssertEqual(i.capacity, 4)
        XCTAssertEqual(i.scaling, .rslora)
        XCTAssertEqual(i.scale, 8, accuracy: 1e-6)
    }

    func testErrors() throws {
        let rt = try Runtime()
        let adapter = try rt.loadPEFT(fixture + "/adapters/lora-r8")
        XCTAssertThrowsError(try adapter.module("layers.9.nope")) { e in
            guard let e = e as? RankfuseError else { return XCTFail("not a RankfuseError: \(e)") }
            XCTAssertEqual(e.status, .notFound)
            XCTAssertTrue(e.message.contains("layers.9.nope"), e.message)
        }
        let base = try rt.openWeights(fixture + "/base.safetensors")
        let io = try rt.openWeights(fixture + "/io.safetensors")
        XCTAssertThrowsError(try rt.linear(x: try io.get("x.layers.0.mlp.down_proj"),
                                           w: try base.get("layers.0.self_attn.q_proj.weight"))) { e in
            XCTAssertEqual((e as? RankfuseError)?.status, .shape)
        }
        XCTAssertThrowsError(try Matrix.f32([1, 2, 3], rows: 2, cols: 2)) { e in
            XCTAssertEqual((e as? RankfuseError)?.status, .shape)
        }
    }
}
