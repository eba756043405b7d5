from setuptools import find_packages, setup

setup(
    name="lavis-evlgen",
    version="0.1.0",
    description="EVLGen (Jian et al., ACL 2024) as a Salesforce LAVIS plugin: one-stage "
    "vision-conditioned language generation with a token-merging connector (TomeFormer).",
    packages=find_packages(include=["lavis_evlgen", "lavis_evlgen.*"]),
    package_data={"lavis_evlgen": ["configs/**/*.yaml", "configs/*/*.yaml", "configs/*/*/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    # Exact versions: requirements.txt + constraints.txt; LAVIS: requirements-nodeps.txt.
    install_requires=[],
)
