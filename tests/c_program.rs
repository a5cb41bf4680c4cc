//! The C ABI from C: tests/c/smoke.c is compiled with the system C compiler against the committed
//! header, linked against the shared and the static library, and run on the PEFT fixtures. The
//! header must also compile as C11 and C++17 with warnings as errors.

mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the cdylib + staticlib (same profile as this test) and returns their directory.
fn build_libs() -> PathBuf {
    let st = Command::new(env!("CARGO"))
        .args(["build", "--lib", "--quiet"])
        .current_dir(root())
        .status()
        .expect("cargo runs");
    assert!(st.success(), "cargo build --lib failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("debug")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn c_program_against_shared_and_static_library() {
    if !have("cc") {
        println!("skipping: no C compiler (cc) on this machine");
        return;
    }
    let lib = build_libs();
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("tests/c/smoke.c");
    let inc = root().join("include");
    let fx = common::fixture("");
    let shared = tmp.path().join("smoke_shared");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&shared)
        .arg(&src)
        .arg("-I")
        .arg(&inc)
        .arg("-L")
        .arg(&lib)
        .args(["-lrankfuse", "-lm"])
        .arg(format!("-Wl,-rpath,{}", lib.display())));
    let out = run(Command::new(&shared).arg(&fx));
    assert!(out.contains("14 modules") && out.contains("ok"), "{out}");
    let stat = tmp.path().join("smoke_static");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&stat)
        .arg(&src)
        .arg("-I")
        .arg(&inc)
        .arg(lib.join("librankfuse.a"))
        .args(["-lpthread", "-ldl", "-lm"]));
    let out = run(Command::new(&stat).arg(&fx));
    assert!(out.contains("ok"), "{out}");
}

fn compile_header(compiler: &str, std: &str, ext: &str, dir: &Path) {
    let src = dir.join(format!("inc.{ext}"));
    std::fs::write(&src, "#include \"rankfuse.h\"\n#include \"rankfuse.h\"\nint main(void) { return (int)RF_STATUS_OK + (int)sizeof(rf_matrix) * 0; }\n").unwrap();
    run(Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(&src));
}

#[test]
fn header_compiles_as_c11_and_cpp17_twice_included() {
    let tmp = tempfile::tempdir().unwrap();
    if have("cc") {
        compile_header("cc", "c11", "c", tmp.path());
    } else {
        println!("skipping C11 check: no cc");
    }
    if have("c++") {
        compile_header("c++", "c++17", "cpp", tmp.path());
    } else {
        println!("skipping C++17 check: no c++");
    }
}

#[test]
fn header_version_macros_match_cargo() {
    let h = std::fs::read_to_string(root().join("include/rankfuse.h")).unwrap();
    let v = env!("CARGO_PKG_VERSION");
    assert!(
        h.contains(&format!("#define RF_VERSION_STRING \"{v}\"")),
        "RF_VERSION_STRING"
    );
    for (mac, val) in [
        ("RF_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("RF_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("RF_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        assert!(h.contains(&format!("#define {mac} {val}\n")), "{mac}");
    }
    // Everything the header declares belongs to the ABI's namespace.
    for line in h.lines() {
        if let Some(rest) = line.strip_prefix("#define ") {
            let name = rest.split_whitespace().next().unwrap();
            assert!(
                name.starts_with("RF_") || name == "RANKFUSE_H",
                "stray macro {name}"
            );
        }
        if let Some(rest) = line.strip_prefix("} ").filter(|r| !r.starts_with(' ')) {
            assert!(rest.starts_with("rf_"), "stray type {rest}");
        }
    }
}

/// tests/c/kinds.c: LoRA, KRAdapter and EigenLoRAx modules created, trained, saved, reloaded
/// and served in one mixed batch from C, bit-identical across the reload.
#[test]
fn c_program_trains_saves_and_serves_every_module_kind() {
    if !have("cc") {
        println!("skipping: no C compiler (cc) on this machine");
        return;
    }
    let lib = build_libs();
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("kinds");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(root().join("tests/c/kinds.c"))
        .arg("-I")
        .arg(root().join("include"))
        .arg("-L")
        .arg(&lib)
        .args(["-lrankfuse", "-lm"])
        .arg(format!("-Wl,-rpath,{}", lib.display())));
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = run(Command::new(&exe).arg(&work));
    println!("{out}");
    assert!(out.contains("kinds: ok"), "{out}");
}
