"""Search spaces: the YAML files and how a trial samples a plan from one."""
