//! Artifacts: every archive format round-trips; hostile archives are refused with nothing
//! written outside the target; inputs come from raw data, --input, or a store.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::tarball::{self, build};
use crate::task_spec::run_spec;
use crate::util::*;

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A tree with nested dirs, an empty file, binary content, an executable, a relative symlink,
/// and a name longer than a tar header holds (a GNU long-name entry before its header).
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    let long = format!("sub/deeper/{}.txt", "n".repeat(120));
    std::fs::write(root.join(long), "a long name\n").unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(root.join("empty"), "").unwrap();
    std::fs::write(root.join("sub/deeper/noise.bin"), noise(300_000, 5)).unwrap();
    std::fs::write(root.join("sub/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("sub/link")).unwrap();
}

/// `diff -r` with symlinks compared as links.
fn assert_same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trees differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a.join("sub/run.sh")), mode(&b.join("sub/run.sh")));
}

#[test]
fn every_archive_format_round_trips_through_a_store() {
    let dir = Dir::new("artifact-roundtrip");
    let tree = dir.join("produced/tree");
    let single = dir.join("produced/single.bin");
    let producer = json!({
        "container": {"command": ["true"]},
        "outputs": {"artifacts": [
            {"name": "default", "path": tree},
            {"name": "tgz1", "path": tree, "archive": {"tar": {"compressionLevel": 1}}},
            {"name": "tgz0", "path": tree, "archive": {"tar": {"compressionLevel": 0}}},
            {"name": "zst", "path": tree, "archive": {"zstd": {}}},
            {"name": "zst9", "path": single, "archive": {"zstd": {"level": 9}}},
            {"name": "raw", "path": single, "archive": {"none": {}}}
        ]}
    });
    make_tree(&tree);
    std::fs::write(&single, noise(1 << 20, 9)).unwrap();
    let (out, outputs) = run_spec(&dir, &producer, &[]);
    out.assert_code(0);
    let artifacts = outputs["outputs"]["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 6, "{outputs}");
    for a in artifacts {
        let stored = dir.join("out").join(a["key"].as_str().unwrap());
        assert_eq!(a["sha256"], sha256_file(&stored), "{a}");
        assert_eq!(a["size"], std::fs::metadata(&stored).unwrap().len(), "{a}");
    }
    let key = |name: &str| {
        artifacts.iter().find(|a| a["name"] == name).unwrap()["key"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        key("default").ends_with("default.tgz")
            && key("zst").ends_with("zst.tar.zst")
            && key("raw").ends_with("raw")
    );
    assert_eq!(
        std::fs::read(dir.join("out").join(key("raw"))).unwrap(),
        std::fs::read(&single).unwrap()
    );

    // Readers other than ours take the archives too: GNU tar unpacks the same tree.
    let gnu = dir.join("gnu");
    std::fs::create_dir_all(&gnu).unwrap();
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(dir.join("out").join(key("default")))
        .arg("-C")
        .arg(&gnu)
        .output()
        .unwrap();
    assert!(
        untar.status.success(),
        "{}",
        String::from_utf8_lossy(&untar.stderr)
    );
    assert_same_tree(&tree, &gnu.join("tree"));

    let got = dir.join("got");
    let consumer = json!({
        "inputs": {"artifacts": [
            {"name": "default", "path": got.join("default"), "key": key("default")},
            {"name": "tgz1", "path": got.join("tgz1"), "key": key("tgz1")},
            {"name": "tgz0", "path": got.join("tgz0"), "s3": {"bucket": "ignored", "key": key("tgz0")}},
            {"name": "zst", "path": got.join("zst"), "key": key("zst")},
            {"name": "zst9", "path": got.join("zst9.bin"), "key": key("zst9")},
            {"name": "raw", "path": got.join("raw.bin"), "key": key("raw"), "mode": 0o600}
        ]},
        "container": {"command": ["true"]}
    });
    let consumer_dir = Dir::new("artifact-roundtrip-consumer");
    let (out, _) = run_spec(
        &consumer_dir,
        &consumer,
        &["--store", dir.join("out").to_str().unwrap()],
    );
    out.assert_code(0);
    for name in ["default", "tgz1", "tgz0", "zst"] {
        assert_same_tree(&tree, &got.join(name));
    }
    for name in ["zst9.bin", "raw.bin"] {
        assert!(
            std::fs::read(got.join(name)).unwrap() == std::fs::read(&single).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::metadata(got.join("raw.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn inputs_come_from_raw_data_and_from_the_command_line() {
    let dir = Dir::new("artifact-inputs");
    let tree = dir.join("tree");
    make_tree(&tree);
    let plain_tar = dir.write(
        "plain.tar",
        build(&[tarball::file("only.txt", b"only one\n")]),
    );
    let target = dir.join("staged");
    let spec = json!({
        "inputs": {"artifacts": [
            {"name": "raw", "path": target.join("raw.txt"), "raw": {"data": "raw\ncontent"}, "mode": 0o755},
            {"name": "dir", "path": target.join("dir")},
            {"name": "tar", "path": target.join("from-tar.txt")},
            {"name": "kept", "path": target.join("kept.tar"), "archive": {"none": {}}},
            {"name": "absent", "path": target.join("absent"), "optional": true}
        ]},
        "container": {"command": ["sh", "-c", "cat $0/raw.txt; echo; cat $0/from-tar.txt", target.to_str().unwrap()]}
    });
    let tree_arg = format!("dir={}", tree.display());
    let tar_arg = format!("tar={}", plain_tar.display());
    let kept_arg = format!("kept={}", plain_tar.display());
    let (out, outputs) = run_spec(
        &dir,
        &spec,
        &[
            "--input", &tree_arg, "--input", &tar_arg, "--input", &kept_arg,
        ],
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "raw\ncontent\nonly one\n");
    assert_eq!(
        std::fs::metadata(target.join("raw.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_same_tree(&tree, &target.join("dir"));
    assert_eq!(
        std::fs::read(target.join("kept.tar")).unwrap(),
        std::fs::read(&plain_tar).unwrap()
    );
    assert!(!target.join("absent").exists());
    assert_eq!(outputs["inputs_digest"].as_str().unwrap().len(), 64);
}

#[test]
fn a_missing_required_input_fails_the_start_and_still_reports() {
    let dir = Dir::new("artifact-missing-input");
    let marker = dir.join("ran");
    let spec = json!({
        "inputs": {"artifacts": [{"name": "data", "path": dir.join("in"), "key": "nope/data.tgz"}]},
        "container": {"command": ["touch", marker]}
    });
    let (out, outputs) = run_spec(&dir, &spec, &["--store", dir.path().to_str().unwrap()]);
    out.assert_code(125)
        .assert_stderr_contains("input artifact \"data\": not found (key \"nope/data.tgz\")");
    assert_eq!(outputs["reason"], "StartFailed");
    assert!(
        !marker.exists(),
        "the command must not run without its input"
    );

    // Without a key, the message says how to give it standalone.
    let spec = json!({
        "inputs": {"artifacts": [{"name": "data", "path": dir.join("in")}]},
        "container": {"command": ["touch", marker]}
    });
    let (out, _) = run_spec(&dir, &spec, &[]);
    out.assert_code(125)
        .assert_stderr_contains("give it with --input data=PATH");
    assert!(!marker.exists());
}

#[test]
fn the_inputs_digest_changes_with_the_inputs_and_only_then() {
    let dir = Dir::new("artifact-digest");
    let spec = json!({"inputs": {"artifacts": [{"name": "d", "path": dir.join("in.txt")}]},
                      "container": {"command": ["true"]}});
    let a = dir.write("a.txt", "one");
    let b = dir.write("b.txt", "two");
    let digest = |file: &Path| {
        let (_, outputs) = run_spec(&dir, &spec, &["--input", &format!("d={}", file.display())]);
        outputs["inputs_digest"].as_str().unwrap().to_owned()
    };
    assert_eq!(digest(&a), digest(&a));
    assert_ne!(digest(&a), digest(&b));
}

/// Stages `archive` as input `evil` into `DIR/target/x`; returns the run.
fn stage_hostile(dir: &Dir, archive: &[u8], compress: Option<&str>) -> Output {
    let mut bytes = archive.to_vec();
    if let Some(tool) = compress {
        let mut child = Command::new(tool)
            .arg("-c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        bytes = child.wait_with_output().unwrap().stdout;
    }
    let evil = dir.write("evil.bin", &bytes);
    let spec = json!({"inputs": {"artifacts": [{"name": "evil", "path": dir.join("target/x")}]},
                      "container": {"command": ["true"]}});
    let (out, outputs) = run_spec(
        dir,
        &spec,
        &["--input", &format!("evil={}", evil.display())],
    );
    assert_eq!(outputs["reason"], "StartFailed", "{}", out.dump());
    out
}

#[test]
fn a_long_name_or_pax_record_over_64_kib_is_refused_before_it_is_read() {
    use tarball::*;
    let name = vec![b'a'; 2 << 20];
    let long_name = Entry {
        name: "././@LongLink",
        kind: b'L',
        link: "",
        data: &name,
    };
    let plain = build(&[long_name, file("x", b"x")]);
    // A pax size= says the next entry's data is 512 bytes (its header says 0), and those bytes
    // look like a header whose data would cover the long name: it is found only by following
    // the pax size, as the tar crate does.
    let decoy = build(&[file("decoy", &[0u8; 512])]);
    let mut hidden = build(&[
        Entry {
            name: "pax",
            kind: b'x',
            link: "",
            data: b"12 size=512\n",
        },
        file("f", &decoy[..512]),
        Entry {
            name: "././@LongLink",
            kind: b'L',
            link: "",
            data: b"",
        },
    ]);
    set_size(&mut hidden, 1024, 0);
    set_size(&mut hidden, 2048, 2 << 20);
    // Headers the tar crate reads in its own way: a guard that read them otherwise would lose
    // its place before the long name (found by review; each got a 2 MiB name through).
    let ustar = b"ustar\x0000";
    let octal = |n: usize| -> [u8; 12] { format!("{n:011o}\0").as_bytes().try_into().unwrap() };
    let long_name = [
        raw_header("././@LongLink", b'L', &octal(2 << 20), ustar),
        padded(b"a"),
    ]
    .concat();
    let pax = |records: &[u8], magic: &[u8; 8]| {
        [
            raw_header("pax", b'x', &octal(records.len()), magic),
            padded(records),
        ]
        .concat()
    };
    let zeros = [raw_header("f", b'0', &octal(512), ustar), vec![0; 512]].concat();
    let tricky: Vec<(&str, Vec<u8>)> = vec![
        (
            "size-cut-at-nul",
            [
                raw_header("f", b'0', b"1\x000000000000", ustar),
                padded(b"y"),
            ]
            .concat(),
        ),
        (
            "size-trimmed",
            [
                raw_header("f", b'0', b"\t0000000001\0", ustar),
                padded(b"y"),
            ]
            .concat(),
        ),
        (
            "pax-taken-by-global",
            [
                pax(b"10 size=0\n", ustar),
                raw_header("g", b'g', &octal(0), ustar),
                zeros.clone(),
            ]
            .concat(),
        ),
        (
            "pax-malformed",
            [pax(b"12 path=a\nb\n10 size=0\n", ustar), zeros.clone()].concat(),
        ),
        (
            // After an entry with magic, or the input is not recognised as tar at all.
            "pax-without-magic",
            [
                raw_header("first", b'0', &octal(1), ustar),
                padded(b"z"),
                pax(b"10 size=0\n", &[0; 8]),
                zeros.clone(),
            ]
            .concat(),
        ),
    ];
    let tricky = tricky
        .into_iter()
        .map(|(name, head)| (name, [head, long_name.clone(), vec![0; 1024]].concat()));
    for (name, archive) in [("plain", plain), ("after-pax", hidden)]
        .into_iter()
        .chain(tricky)
    {
        let dir = Dir::new(&format!("hostile-longname-{name}"));
        let out = stage_hostile(&dir, &archive, Some("gzip"));
        out.assert_code(125)
            .assert_stderr_contains("a long name or pax record of 2097152 bytes");
        let outputs = std::fs::metadata(dir.join("out/outputs.json"))
            .unwrap()
            .len();
        assert!(
            outputs < 64 * 1024,
            "{name}: outputs.json is {outputs} bytes"
        );
    }
}

#[test]
fn an_entry_dated_past_the_clocks_range_is_unpacked_without_its_date() {
    let dir = Dir::new("archive-far-mtime");
    let mut archive = build(&[tarball::file("f.txt", b"kept\n")]);
    tarball::far_future_mtime(&mut archive);
    let input = dir.write("in.tar", &archive);
    let target = dir.join("target"); // a lone file becomes the target itself
    let spec = json!({"inputs": {"artifacts": [{"name": "in", "path": target}]},
                      "container": {"command": ["cat", target]}});
    let (out, _) = run_spec(
        &dir,
        &spec,
        &["--input", &format!("in={}", input.display())],
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "kept\n");
}

/// Every file under `dir`, so a test can prove nothing appeared anywhere else.
fn listing(dir: &Path) -> Vec<String> {
    let out = Command::new("find").arg(dir).output().unwrap();
    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn hostile_archives_are_refused_and_nothing_lands_outside() {
    use tarball::*;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "tar-slip",
            build(&[file("ok.txt", b"ok"), file("../../escaped.txt", b"pwned")]),
            "points outside the target",
        ),
        (
            "absolute",
            build(&[file("/tmp/emissary-absolute-escape.txt", b"pwned")]),
            "points outside the target",
        ),
        (
            "symlink-escape",
            build(&[symlink("link", "../../.."), file("ok", b"x")]),
            "points outside the target",
        ),
        (
            "symlink-absolute",
            build(&[symlink("etc", "/etc")]),
            "points outside the target",
        ),
        (
            "through-symlink",
            build(&[dir("d"), symlink("d/up", ".."), file("d/up/x", b"x")]),
            "through a symlink",
        ),
        (
            // Lexically inside, but l0 leads to the root and l1 one above it.
            "symlink-chain",
            build(&[
                file("ok", b"x"),
                dir("d"),
                symlink("d/l0", ".."),
                symlink("d/l1", "l0/.."),
            ]),
            "points outside the target",
        ),
        (
            // The lone top directory becomes the target itself: `..` from it is outside.
            "symlink-lifted",
            build(&[dir("top"), symlink("top/up", "../secret")]),
            "points outside the target",
        ),
        ("lone-symlink", build(&[symlink("x", ".")]), "lone symlink"),
        (
            "hardlink-escape",
            build(&[hardlink("passwd", "../../../../etc/passwd")]),
            "points outside the target",
        ),
        (
            "hardlink-missing",
            build(&[hardlink("h", "not-there")]),
            "no such file in the archive",
        ),
        ("device", build(&[device("null")]), "not allowed"),
    ];
    for (name, archive, message) in cases {
        for compress in [None, Some("gzip"), Some("zstd")] {
            let dir = Dir::new(&format!("hostile-{name}"));
            let before = listing(dir.path());
            let out = stage_hostile(&dir, &archive, compress);
            out.assert_code(125).assert_stderr_contains(message);
            let mut after = listing(dir.path());
            // Only the run's own files may appear: the evil input and the out directory.
            after.retain(|p| {
                !p.contains("/out") && !p.ends_with("evil.bin") && !p.ends_with("spec.json")
            });
            assert_eq!(
                after,
                before,
                "{name} ({compress:?}) left files behind{}",
                out.dump()
            );
        }
    }
    assert!(!Path::new("/tmp/emissary-absolute-escape.txt").exists());
}

#[test]
fn oversized_archives_are_refused() {
    let dir = Dir::new("hostile-big");
    let data = vec![0u8; 4096];
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<_> = names.iter().map(|n| tarball::file(n, &data)).collect();
    let archive = build(&entries);
    let evil = dir.write("evil.bin", &archive);
    let spec = json!({"inputs": {"artifacts": [{"name": "evil", "path": dir.join("target/x")}]},
                      "container": {"command": ["true"]}});
    let spec_path = dir.write("spec.json", serde_json::to_vec(&spec).unwrap());
    let input = format!("evil={}", evil.display());
    for (var, value, message) in [
        (
            "EMISSARY_MAX_INPUT_BYTES",
            "100000",
            "more than the limit of 100000 bytes",
        ),
        ("EMISSARY_MAX_INPUT_ENTRIES", "10", "more than 10 entries"),
    ] {
        let out = run_quick(
            emissary([
                "run",
                "--template",
                spec_path.to_str().unwrap(),
                "--out",
                dir.join("out").to_str().unwrap(),
                "--input",
                &input,
            ])
            .env(var, value),
        );
        out.assert_code(125).assert_stderr_contains(message);
        assert!(!dir.join("target/x").exists());
    }
}

#[test]
fn outputs_are_collected_even_when_some_are_missing_or_the_step_fails() {
    let dir = Dir::new("outputs-partial");
    let made = dir.join("made.txt");
    let spec = json!({
        "container": {"command": ["sh", "-c", format!("printf 'v\\n\\n' > {}; exit 2", made.display())]},
        "outputs": {
            "parameters": [
                {"name": "made", "valueFrom": {"path": made}},
                {"name": "defaulted", "valueFrom": {"path": dir.join("none"), "default": "fallback"}},
                {"name": "required", "valueFrom": {"path": dir.join("none")}}
            ],
            "artifacts": [
                {"name": "file", "path": made, "archive": {"none": {}}},
                {"name": "optional", "path": dir.join("none"), "optional": true},
                {"name": "required-art", "path": dir.join("none2")}
            ]
        }
    });
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(2);
    assert_eq!(
        outputs["outputs"]["parameters"],
        json!([{"name": "made", "value": "v\n"}, {"name": "defaulted", "value": "fallback"}])
    );
    assert_eq!(outputs["outputs"]["artifacts"].as_array().unwrap().len(), 1);
    let message = outputs["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("exited with code 2")
            && message.contains("\"required\"")
            && message.contains("\"required-art\""),
        "{message}"
    );

    // The same missing outputs fail a step whose command succeeded: 125, and still reported.
    let spec_ok = json!({"container": {"command": ["true"]}, "outputs": spec["outputs"].clone()});
    let (out, outputs) = run_spec(&dir, &spec_ok, &[]);
    out.assert_code(125)
        .assert_stderr_contains("\"required-art\"");
    assert_eq!(outputs["reason"], "Error");
    assert_eq!(outputs["error"]["kind"], "user");
}

#[test]
fn the_result_keeps_the_last_256_kib_and_says_so() {
    let dir = Dir::new("outputs-result");
    let spec = json!({"container": {"command": ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a; echo; echo END"]}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(0);
    let result = outputs["outputs"]["result"].as_str().unwrap();
    assert_eq!(outputs["outputs"]["result_truncated"], true);
    assert!(
        result.ends_with("a\nEND") && result.len() == 256 * 1024,
        "len {}",
        result.len()
    );

    // Exactly 256 KiB and its newline: the newline goes, the result is whole.
    let spec = json!({"container": {"command": ["sh", "-c", "head -c 262144 /dev/zero | tr '\\0' b; echo"]}});
    let (_, outputs) = run_spec(&dir, &spec, &[]);
    assert_eq!(
        outputs["outputs"]["result"].as_str().unwrap().len(),
        256 * 1024
    );
    assert!(
        outputs["outputs"].get("result_truncated").is_none(),
        "{}",
        outputs["outputs"]["result_truncated"]
    );

    let spec = json!({"container": {"command": ["printf", "two lines\\n\\n"]}});
    let (_, outputs) = run_spec(&dir, &spec, &[]);
    assert_eq!(outputs["outputs"]["result"], "two lines\n");
    assert!(outputs["outputs"].get("result_truncated").is_none());
}

#[test]
fn a_fifo_where_an_input_was_expected_is_an_error_or_left_out_not_a_hang() {
    let dir = Dir::new("inputs-fifo");
    let store = dir.join("store");
    let tree = dir.join("tree");
    std::fs::create_dir_all(store.join("k")).unwrap();
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("file"), b"kept").unwrap();
    for fifo in [store.join("k/fifo"), tree.join("pipe")] {
        assert!(
            Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
    }
    let staged = dir.join("staged");
    let spec = json!({"container": {"command": ["ls", staged]},
                      "inputs": {"artifacts": [{"name": "tree", "path": staged}]}});
    let (out, _) = run_spec(
        &dir,
        &spec,
        &["--input", &format!("tree={}", tree.display())],
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "file\n", "{}", out.dump());

    let spec = json!({"container": {"command": ["true"]},
                      "inputs": {"artifacts": [{"name": "in", "path": dir.join("in"), "s3": {"key": "k/fifo"}}]}});
    let (out, outputs) = run_spec(&dir, &spec, &["--store", store.to_str().unwrap()]);
    out.assert_code(125)
        .assert_stderr_contains("not a regular file");
    assert_eq!(outputs["reason"], "StartFailed");
}

#[test]
fn a_fifo_or_device_where_an_output_was_expected_is_an_error_not_a_hang() {
    let dir = Dir::new("outputs-fifo");
    let fifo = dir.join("fifo");
    let tree = dir.join("tree");
    let spec = json!({
        "container": {"command": ["sh", "-c", format!(
            "mkfifo {0} && mkdir {1} && mkfifo {1}/pipe && echo kept > {1}/file && ln -s file {1}/link && mkfifo $EMISSARY_PROGRESS_FILE",
            fifo.display(), tree.display())]},
        "outputs": {
            "parameters": [
                {"name": "from-fifo", "valueFrom": {"path": fifo}},
                {"name": "from-device", "valueFrom": {"path": "/dev/zero"}}
            ],
            "artifacts": [
                {"name": "tree", "path": tree, "archive": {"tar": {}}},
                {"name": "linked", "path": tree.join("link"), "archive": {"none": {}}},
                {"name": "raw-fifo", "path": fifo, "archive": {"none": {}}}
            ]
        }
    });
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(125);
    let message = outputs["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"from-fifo\"")
            && message.contains("\"from-device\"")
            && message.contains("not a regular file")
            && message.contains("\"raw-fifo\": archive none takes a single file"),
        "{message}"
    );
    assert_eq!(
        outputs["error"]["kind"], "user",
        "the step's outputs, not the store"
    );
    // A symlink to a file stores the file's bytes.
    assert_eq!(outputs["outputs"]["artifacts"][1]["name"], "linked");
    assert_eq!(outputs["outputs"]["artifacts"][1]["size"], 5);
    assert_eq!(outputs["outputs"]["artifacts"].as_array().unwrap().len(), 2);
    // The directory is archived without its FIFO (nothing to read in it).
    assert_eq!(outputs["outputs"]["artifacts"][0]["name"], "tree");
    let names = tar_names(&dir.join("out/artifacts/tree.tgz"));
    assert!(
        names.iter().any(|n| n.ends_with("file")) && !names.iter().any(|n| n.ends_with("pipe")),
        "{names:?}"
    );
}

/// The entry names of a tar+gzip archive.
fn tar_names(path: &Path) -> Vec<String> {
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap());
    tar::Archive::new(gz)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}
