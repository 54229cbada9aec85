# AgentBench's "<localhost>/packages" image: the default image plus npm (tasks that ask about installed packages).
#   docker build -f infra/os_images/packages.Dockerfile -t local-os/packages infra/os_images
FROM local-os/default
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm \
    && rm -rf /var/lib/apt/lists/*
