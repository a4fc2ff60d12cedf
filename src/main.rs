//! The `d7q` binary: see `d7q::cli`.

fn main() {
    std::process::exit(d7q::cli::main());
}
