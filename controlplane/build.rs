// `sqlx::migrate!` embeds the migration files at compile time, but cargo
// does not notice a new file in the directory by itself: rebuild on any
// change there (as sqlx's documentation advises).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
