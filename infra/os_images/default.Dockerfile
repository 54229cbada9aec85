# AgentBench's OS-task image ("<localhost>/default"): Ubuntu with python3, pip, git, vim, curl, wget, unzip,
# zip and tree, the tools its tasks and checker scripts assume. `create.image` may name another tag.
#   docker build -f infra/os_images/default.Dockerfile -t local-os/default infra/os_images
ARG UBUNTU_VERSION=22.04
FROM ubuntu:${UBUNTU_VERSION}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-pip git vim curl wget unzip zip tree ca-certificates procps \
    && rm -rf /var/lib/apt/lists/*
CMD ["bash"]
