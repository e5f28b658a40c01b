mod report;
fn main() {}
