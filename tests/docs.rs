//! The README is the crate's front page: its quickstart must be `examples/quickstart.rs`,
//! verbatim (the example runs in CI; the README's copy runs as a doctest of the crate docs).

#[test]
fn readme_quickstart_is_the_example_verbatim() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/quickstart.rs");
    // The example is the snippet plus its leading doc comment.
    let code: String = example
        .lines()
        .skip_while(|l| l.starts_with("//!") || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        code.contains("#[global_allocator]"),
        "the example lost its allocator"
    );
    assert!(
        readme.contains(&format!("```rust\n{code}```\n")),
        "README.md's quickstart differs from examples/quickstart.rs"
    );
}

#[test]
fn readme_gives_the_two_commands_near_the_top() {
    let readme = include_str!("../README.md");
    let top: String = readme.lines().take(20).collect::<Vec<_>>().join("\n");
    assert!(top.contains("cargo run --release --example tenant_server -- --demo"));
    assert!(top.contains("cargo test --workspace --all-features"));
}
