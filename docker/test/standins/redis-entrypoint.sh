#!/bin/sh
# The official image's Redis runs with protected mode off (it is reached over the container
# network, from other containers); Debian's would refuse them. Same command line otherwise.
if [ "${1:-}" = redis-server ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
