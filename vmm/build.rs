//! Links the `vmm` binary with `startup-text.ld`, which gathers the code and read-only data its
//! start touches into sections of their own, before `.text` and `.rodata` (written by
//! scripts/startup-layout; the file says why).

fn main() {
    println!("cargo::rerun-if-changed=startup-text.ld");
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo::rustc-link-arg-bin=vmm=-Wl,-T,{dir}/startup-text.ld");
    }
}
