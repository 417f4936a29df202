#[global_allocator]
static ALLOCATOR: qwen_run::bench::alloc_count::Counting = qwen_run::bench::alloc_count::Counting;

fn main() {
    qwen_run::bench::alloc_count::Counting::mark_installed();
    std::process::exit(qwen_run::cli::main());
}
