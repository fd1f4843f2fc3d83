/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/bitflags-b5e5fe4db16e07fd.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/libbitflags-b5e5fe4db16e07fd.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/work/main/fuzz/target/x86_64-unknown-linux-gnu/release/deps/libbitflags-b5e5fe4db16e07fd.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs:
