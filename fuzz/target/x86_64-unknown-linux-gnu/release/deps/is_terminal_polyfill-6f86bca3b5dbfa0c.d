/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/is_terminal_polyfill-6f86bca3b5dbfa0c.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/is_terminal_polyfill-1.70.2/src/lib.rs

/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/libis_terminal_polyfill-6f86bca3b5dbfa0c.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/is_terminal_polyfill-1.70.2/src/lib.rs

/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/libis_terminal_polyfill-6f86bca3b5dbfa0c.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/is_terminal_polyfill-1.70.2/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/is_terminal_polyfill-1.70.2/src/lib.rs:
