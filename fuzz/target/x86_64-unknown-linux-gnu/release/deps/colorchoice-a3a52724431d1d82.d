/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/colorchoice-a3a52724431d1d82.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/colorchoice-1.0.5/src/lib.rs

/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/libcolorchoice-a3a52724431d1d82.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/colorchoice-1.0.5/src/lib.rs

/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/libcolorchoice-a3a52724431d1d82.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/colorchoice-1.0.5/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/colorchoice-1.0.5/src/lib.rs:
