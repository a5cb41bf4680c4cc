//! Gives the shared library its soname on ELF targets (`librankfuse.so.<major>`), so every
//! build of the cdylib (`cargo build`, `cargo test`, scripts/install.sh) is the one installed
//! and one build serves all of them. `cargo:rustc-cdylib-link-arg` reaches the cdylib's link
//! only: test binaries, the CLI and the staticlib are untouched.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    match os.as_str() {
        "linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly" => {
            println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librankfuse.so.{major}");
        }
        "macos" | "ios" => {
            println!(
                "cargo:rustc-cdylib-link-arg=-Wl,-install_name,@rpath/librankfuse.{major}.dylib"
            );
        }
        _ => {}
    }
}
