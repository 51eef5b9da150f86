//! The image: the Dockerfile builds with the project's own setup and a locked
//! release build and ships only the binary; .dockerignore leaves out what the
//! build does not need, and nothing it does.
mod support;

use support::deploy::{
    fail_on,
    image::{Dockerfile, dockerfile_problems, dockerignore},
};

#[test]
fn the_image_builds_with_the_projects_setup_and_ships_only_the_binary() {
    fail_on(dockerfile_problems(&Dockerfile::load(), &dockerignore()));
}
