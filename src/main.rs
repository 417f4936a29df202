fn main() {
    std::process::exit(qwen_run::cli::main());
}
