// Rebuild when bpf-linker changes: cargo cannot see that the link step depends on it.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo::warning=bpf-linker not found on PATH; run scripts/setup.sh"),
    }
}
