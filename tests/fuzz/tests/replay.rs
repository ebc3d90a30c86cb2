//! Every seed and every finding of `make fuzz`, replayed through its check on stable: a
//! finding fixed once stays fixed.

use std::path::Path;

#[test]
fn every_seed_and_finding_passes_its_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for &(target, check) in emissary_fuzz::TARGETS {
        let mut seeds = 0;
        for kind in ["seeds", "findings"] {
            let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            let mut files: Vec<_> = dir.map(|e| e.unwrap().path()).collect();
            files.sort();
            for file in files {
                let data = std::fs::read(&file).unwrap();
                if std::panic::catch_unwind(|| check(&data)).is_err() {
                    panic!("{target}: {} fails its check", file.display());
                }
                seeds += usize::from(kind == "seeds");
            }
        }
        assert!(seeds > 0, "{target} has no seeds in seeds/{target}");
    }
    emissary_fuzz::clean_up();
}
