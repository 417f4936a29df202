// Counting every allocation costs an atomic add each; only a build that asks for the counts
// (`--features count-allocations`, for `qwen-run bench`) pays it.
#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: qwen_run::bench::alloc_count::Counting = qwen_run::bench::alloc_count::Counting;

fn main() {
    #[cfg(feature = "count-allocations")]
    qwen_run::bench::alloc_count::Counting::mark_installed();
    std::process::exit(qwen_run::cli::main());
}
