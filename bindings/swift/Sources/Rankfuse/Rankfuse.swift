// rankfuse for Swift: a thin layer over the C ABI (include/rankfuse.h), mirroring the Go package.
//
// One final class per C handle (Runtime, Weights, Adapter; Lora is borrowed from its Adapter and
// keeps it alive); deinit frees. Children hold a strong reference to what they need (an Adapter
// or Weights its Runtime), so ARC frees in the order the C contract requires. Failing calls
// throw RankfuseError with the stable status and the library's message.
//
// Matrices: Matrix.f32 / .bf16 / .f16 wrap Swift arrays (copy-on-write: no copy is made) and are
// passed to C inside withUnsafeBytes; Weights.get returns a view of the memory-mapped file that
// keeps the Weights alive. Thread safety is the C ABI's: Runtime.linear may run from many
// threads on shared objects; Lora.setRank needs exclusive access to that lora.
//
// NOTE: CI does not compile this package (no Swift toolchain on the build machines).

import CRankfuse

// MARK: - errors

/// A stable status number (rf_status).
public struct Status: RawRepresentable, Equatable, Hashable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let ok = Status(rawValue: 0)
    public static let invalidArgument = Status(rawValue: 1)
    public static let shape = Status(rawValue: 2)
    public static let dtype = Status(rawValue: 3)
    public static let notFound = Status(rawValue: 4)
    public static let io = Status(rawValue: 5)
    public static let format = Status(rawValue: 6)
    public static let unsupported = Status(rawValue: 7)
    public static let device = Status(rawValue: 8)
    public static let outOfMemory = Status(rawValue: 9)
    public static let numeric = Status(rawValue: 10)
    public static let `internal` = Status(rawValue: 11)

    static let names = ["OK", "INVALID_ARGUMENT", "SHAPE", "DTYPE", "NOT_FOUND", "IO", "FORMAT",
                        "UNSUPPORTED", "DEVICE", "OUT_OF_MEMORY", "NUMERIC", "INTERNAL"]
    public var description: String {
        rawValue >= 0 && Int(rawValue) < Status.names.count
            ? Status.names[Int(rawValue)] : "STATUS(\(rawValue))"
    }
}

/// What every failing call throws: the status and the library's message (which names the
/// offending argument, tensor, module or file).
public struct RankfuseError: Error, CustomStringConvertible {
    public let status: Status
    public let message: String
    public var description: String { "rankfuse: \(status): \(message)" }
}

/// Takes ownership of an rf_error: returns for NULL, else frees it and throws.
@inline(__always)
func check(_ e: OpaquePointer?) throws {
    guard let e = e else { return }
    let status = Status(rawValue: Int32(truncatingIfNeeded: rf_error_code(e).rawValue))
    let message = String(cString: rf_error_message(e))
    rf_error_free(e)
    throw RankfuseError(status: status, message: message)
}

/// The library version ("MAJOR.MINOR.PATCH") and the ABI it implements.
public var version: String { String(cString: rf_version()) }
public var abiVersion: UInt32 { rf_abi_version() }
/// RF_ABI_VERSION of the header this package was compiled against.
public let headerABIVersion = UInt32(RF_ABI_VERSION)

// MARK: - matrices

/// Element types (rf_dtype).
public enum DType: Int32 {
    case f32 = 0, f16 = 1, bf16 = 2

    var c: rf_dtype { rf_dtype(rawValue: numericCast(rawValue)) }
    public var size: Int { self == .f32 ? 4 : 2 }
}

/// A row-major matrix: rows x cols elements of dtype, ld elements between row starts.
public struct Matrix {
    enum Storage {
        case floats([Float])
        case halves([UInt16])
        case mapped(UnsafeRawPointer?, Weights)
    }
    public let dtype: DType
    public let rows: Int
    public let cols: Int
    public let ld: Int
    let storage: Storage

    static func checked(_ storage: Storage, _ count: Int, _ dtype: DType,
                        _ rows: Int, _ cols: Int, _ ld: Int) throws -> Matrix {
        let ld = ld == 0 ? cols : ld
        guard rows >= 0, cols >= 0, ld >= cols else {
            throw RankfuseError(status: .shape,
                                message: "matrix \(rows) x \(cols) with ld \(ld) is not a valid shape")
        }
        let need = rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols
        guard count >= need else {
            throw RankfuseError(status: .shape, message:
                "array of \(count) elements is too small for \(rows) x \(cols) (ld \(ld)): \(need) needed")
        }
        return Matrix(dtype: dtype, rows: rows, cols: cols, ld: ld, storage: storage)
    }

    /// A [Float] as an F32 matrix (ld 0 = cols).
    public static func f32(_ data: [Float], rows: Int, cols: Int, ld: Int = 0) throws -> Matrix {
        try checked(.floats(data), data.count, .f32, rows, cols, ld)
    }
    /// A [UInt16] of bfloat16 bits as a BF16 matrix.
    public static func bf16(_ data: [UInt16], rows: Int, cols: Int, ld: Int = 0) throws -> Matrix {
        try checked(.halves(data), data.count, .bf16, rows, cols, ld)
    }
    /// A [UInt16] of IEEE half bits as an F16 matrix.
    public static func f16(_ data: [UInt16], rows: Int, cols: Int, ld: Int = 0) throws -> Matrix {
        try checked(.halves(data), data.count, .f16, rows, cols, ld)
    }

    /// The elements of an F32 matrix, compact row-major (a copy for mapped views).
    public func floats() throws -> [Float] {
        guard dtype == .f32 else {
            throw RankfuseError(status: .dtype, message: "floats() on a \(dtype) matrix")
        }
        var out = [Float](repeating: 0, count: rows * cols)
        try withRawPointer { p in
            guard let p = p else { return }
            let src = p.assumingMemoryBound(to: Float.self)
            for i in 0..<rows {
                for j in 0..<cols { out[i * cols + j] = src[i * ld + j] }
            }
        }
        return out
    }

    /// Runs body with the address of element (0, 0), valid only during body.
    func withRawPointer<R>(_ body: (UnsafeRawPointer?) throws -> R) throws -> R {
        switch storage {
        case .floats(let a): return try a.withUnsafeBytes { try body($0.baseAddress) }
        case .halves(let a): return try a.withUnsafeBytes { try body($0.baseAddress) }
        case .mapped(let p, let w):
            defer { withExtendedLifetime(w) {} }
            return try body(p)
        }
    }

    func raw(_ p: UnsafeRawPointer?) -> rf_matrix {
        rf_matrix(data: UnsafeMutableRawPointer(mutating: p), dtype: dtype.c,
                  rows: Int64(rows), cols: Int64(cols), ld: Int64(ld))
    }
}

// MARK: - runtime

/// A runtime (CPU, all cores by default). Thread-safe for compute calls.
public final class Runtime {
    let ptr: OpaquePointer

    /// threads 0 = all cores; device 0 = CPU, 1 = CUDA.
    public init(threads: UInt32 = 0, device: Int32 = 0, deviceIndex: Int32 = 0) throws {
        var opts = rf_runtime_options()
        opts.struct_size = UInt32(MemoryLayout<rf_runtime_options>.size)
        opts.device = rf_device(rawValue: numericCast(device))
        opts.device_index = deviceIndex
        opts.num_threads = threads
        opts.cuda_stream = nil
        var out: OpaquePointer?
        try check(rf_runtime_create(&opts, &out))
        ptr = out!
    }

    deinit { rf_runtime_free(ptr) }

    /// Runtime facts as JSON (version, backend, CPU features, kernel variant, threads, GPU).
    public func info() throws -> String {
        var n = 0
        try check(rf_runtime_info(ptr, nil, 0, &n))
        var buf = [CChar](repeating: 0, count: n + 1)
        try check(rf_runtime_info(ptr, &buf, buf.count, &n))
        return String(cString: buf)
    }

    /// Memory-maps a *.safetensors file or a sharded *.safetensors.index.json.
    public func openWeights(_ path: String) throws -> Weights {
        var out: OpaquePointer?
        try check(rf_weights_open(ptr, path, &out))
        return Weights(out!, self)
    }

    /// Loads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).
    public func loadPEFT(_ dir: String) throws -> Adapter {
        var out: OpaquePointer?
        try check(rf_adapter_load_peft(ptr, dir, &out))
        return Adapter(out!, self)
    }

    /// y = x W^T + bias + sum over slots of scale(slot) * (x A[:r]^T) B[:, :r]^T, into a new
    /// rows(x) x rows(w) matrix of outDType. rowSlot nil: every slot applies to every row; else
    /// one entry per row of x (index into slots, -1 = base only).
    public func linear(x: Matrix, w: Matrix, bias: Matrix? = nil, slots: [Slot] = [],
                       rowSlot: [Int32]? = nil, outDType: DType = .f32) throws -> Matrix {
        if let rs = rowSlot, rs.count != x.rows {
            throw RankfuseError(status: .shape,
                                message: "rowSlot has \(rs.count) entries, x has \(x.rows) rows")
        }
        let cslots = slots.map {
            rf_lora_slot(lora: $0.lora?.ptr, rank: $0.rank, scale_mult: $0.scaleMult)
        }
        let n = x.rows * w.rows
        var floats = [Float](), halves = [UInt16]()
        if outDType == .f32 { floats = [Float](repeating: 0, count: n) } else {
            halves = [UInt16](repeating: 0, count: n)
        }
        func call(_ yp: UnsafeMutableRawPointer?) throws {
            try x.withRawPointer { xp in
                try w.withRawPointer { wp in
                    var xm = x.raw(xp), wm = w.raw(wp)
                    var ym = rf_matrix(data: yp, dtype: outDType.c, rows: Int64(x.rows),
                                       cols: Int64(w.rows), ld: Int64(w.rows))
                    func run(_ bm: UnsafePointer<rf_matrix>?) throws {
                        if let rs = rowSlot {
                            try check(rf_linear(ptr, &xm, &wm, bm, cslots, cslots.count, rs, &ym))
                        } else {
                            try check(rf_linear(ptr, &xm, &wm, bm, cslots, cslots.count, nil, &ym))
                        }
                    }
                    if let b = bias {
                        try b.withRawPointer { bp in
                            var bm = b.raw(bp)
                            try run(&bm)
                        }
                    } else {
                        try run(nil)
                    }
                }
            }
        }
        if outDType == .f32 {
            try floats.withUnsafeMutableBytes { try call($0.baseAddress) }
        } else {
            try halves.withUnsafeMutableBytes { try call($0.baseAddress) }
        }
        withExtendedLifetime(slots) {}
        if outDType == .f32 {
            return try Matrix.f32(floats, rows: x.rows, cols: w.rows)
        }
        return try Matrix.checked(.halves(halves), n, outDType, x.rows, w.rows, 0)
    }
}

// MARK: - weights

/// Opened (memory-mapped) safetensors: immutable, safe to share across threads.
public final class Weights {
    let ptr: OpaquePointer
    let runtime: Runtime

    init(_ ptr: OpaquePointer, _ runtime: Runtime) {
        self.ptr = ptr
        self.runtime = runtime
    }

    deinit { rf_weights_free(ptr) }

    public var count: Int { rf_weights_count(ptr) }

    /// Name of tensor i (file order).
    public func name(_ i: Int) throws -> String {
        guard i >= 0 else {
            throw RankfuseError(status: .invalidArgument, message: "index \(i) is negative")
        }
        var n: UnsafePointer<CChar>?
        try check(rf_weights_name(ptr, i, &n))
        return String(cString: n!)
    }

    public func names() throws -> [String] { try (0..<count).map { try name($0) } }

    /// A zero-copy, read-only view of a tensor (1-D as 1 x n); it keeps these Weights alive.
    public func get(_ name: String) throws -> Matrix {
        var m = rf_matrix()
        try check(rf_weights_get(ptr, name, &m))
        guard let dt = DType(rawValue: Int32(truncatingIfNeeded: m.dtype.rawValue)) else {
            throw RankfuseError(status: .dtype, message: "tensor '\(name)': unknown dtype")
        }
        return Matrix(dtype: dt, rows: Int(m.rows), cols: Int(m.cols), ld: Int(m.ld),
                      storage: .mapped(UnsafeRawPointer(m.data), self))
    }
}

// MARK: - adapters

/// How a LoRA's scale follows its rank (rf_scaling).
public enum Scaling: Int32 {
    case lora = 0, rslora = 1, fixed = 2
}

/// What Lora.info reports; scale is the scale at rank.
public struct LoraInfo: Equatable {
    public let inFeatures: Int64
    public let outFeatures: Int64
    public let capacity: UInt32
    public let rank: UInt32
    public let alpha: Float
    public let scale: Float
    public let scaling: Scaling?
    public let dtype: DType?
}

/// A loaded adapter: a named set of LoRA modules.
public final class Adapter {
    let ptr: OpaquePointer
    let runtime: Runtime

    init(_ ptr: OpaquePointer, _ runtime: Runtime) {
        self.ptr = ptr
        self.runtime = runtime
    }

    deinit { rf_adapter_free(ptr) }

    public var moduleCount: Int { rf_adapter_module_count(ptr) }

    /// Name of module i (sorted order).
    public func moduleName(_ i: Int) throws -> String {
        guard i >= 0 else {
            throw RankfuseError(status: .invalidArgument, message: "index \(i) is negative")
        }
        var n: UnsafePointer<CChar>?
        try check(rf_adapter_module_name(ptr, i, &n))
        return String(cString: n!)
    }

    public func moduleNames() throws -> [String] { try (0..<moduleCount).map { try moduleName($0) } }

    /// The module at the base model's module path, e.g. "layers.0.self_attn.q_proj".
    public func module(_ name: String) throws -> Lora {
        var out: OpaquePointer?
        try check(rf_adapter_module(ptr, name, &out))
        return Lora(out!, self)
    }

    /// Writes a PEFT folder (created if missing).
    public func savePEFT(_ dir: String) throws {
        try check(rf_adapter_save_peft(ptr, dir))
    }
}

/// One LoRA module, borrowed from its Adapter (which it keeps alive).
public final class Lora {
    let ptr: OpaquePointer
    let adapter: Adapter

    init(_ ptr: OpaquePointer, _ adapter: Adapter) {
        self.ptr = ptr
        self.adapter = adapter
    }

    public func info() throws -> LoraInfo {
        var i = rf_lora_info()
        try check(rf_lora_info_get(ptr, &i))
        return LoraInfo(inFeatures: i.in_features, outFeatures: i.out_features,
                        capacity: i.capacity, rank: i.rank, alpha: i.alpha, scale: i.scale,
                        scaling: Scaling(rawValue: Int32(truncatingIfNeeded: i.scaling.rawValue)),
                        dtype: DType(rawValue: Int32(truncatingIfNeeded: i.dtype.rawValue)))
    }

    /// Default rank of later calls (1..capacity). Needs exclusive access to this lora.
    public func setRank(_ rank: UInt32) throws {
        try check(rf_lora_set_rank(ptr, rank))
    }
}

/// One adapter slot of a fused call: rank 0 = the lora's current rank; scaleMult multiplies its
/// scale; lora nil = no adapter in this slot.
public struct Slot {
    public var lora: Lora?
    public var rank: UInt32
    public var scaleMult: Float
    public init(_ lora: Lora?, rank: UInt32 = 0, scaleMult: Float = 1) {
        self.lora = lora
        self.rank = rank
        self.scaleMult = scaleMult
    }
}
