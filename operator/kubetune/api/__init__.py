"""The operator's table of kinds (`resources`): plurals, short names, printer columns.
The models themselves live in the `kubetune_api` package, shared with the trainers."""
