fn main() {
    println!("tuneloop {}", env!("CARGO_PKG_VERSION"));
}
