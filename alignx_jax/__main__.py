from alignx_jax.cli import run

run()
