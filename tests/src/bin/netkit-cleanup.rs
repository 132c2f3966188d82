//! Removes what killed test runs left behind (kit namespaces and their
//! processes, cgroups, bpffs pin directories). `cargo xtask cleanup`.

fn main() {
    if !netkit::is_root() {
        eprintln!("netkit-cleanup: needs root; nothing done");
        std::process::exit(1);
    }
    let removed = netkit::cleanup_leaked();
    if removed.is_empty() {
        println!("netkit-cleanup: nothing leaked");
    } else {
        for r in &removed {
            println!("netkit-cleanup: removed {r}");
        }
    }
}
